"""Compile budgets of the Triton kernels for NVIDIA GPUs, without a GPU (docs/triton.md).

    python bench/compile_budget.py [--family "NVIDIA H200"]... [--problem NAME]...   # prints a table
    python bench/compile_budget.py --jsonl                                          # one JSON line per kernel

Run it without TRITON_INTERPRET (the interpreter replaces @triton.jit kernels with Python).
``make compile-budget-triton36`` runs it with the GPU machine's triton 3.6; tests/test_triton_compile.py
with the installed (CI) triton.

What is compiled is what the launchers start, whatever the kernels are: each problem runs through the
package's own launchers (``attention.backends.triton.launch.forward`` and the Triton selection backend)
on ``meta`` tensors, with the plan of a shipped GPU family (``ATTENTION_TRITON_TARGET``), while
``JITFunction.run`` records every launch instead of running it. Each recorded launch is then compiled
as the JIT would compile it on that GPU: the JIT's own binder specializes the recorded arguments
(integers equal to 1, e.g. unit strides, become constants; pointers and integers divisible by 16 get
``tt.divisibility=16``), for the family's architecture. A compile check with plain i32 arguments
builds a different kernel (docs/traps.md). Reported per kernel: registers and stack bytes (spills) from
``cuobjdump -res-usage``, shared memory from the compile metadata, and for the kernel that
``triton.autotune`` prunes by shared memory (selective_attention_fwd_kernel) the launcher's estimate
(``launch.smem_estimate``), which must not undercount.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Shipped device families (attention/tuning/triton_defaults.json) and their architectures.
ARCH = {"NVIDIA H200": 90, "NVIDIA H100": 90, "NVIDIA A100": 80, "NVIDIA L40S": 89, "NVIDIA GeForce RTX 4090": 89}
SM_COUNT = {"NVIDIA H200": 132, "NVIDIA H100": 132, "NVIDIA A100": 108, "NVIDIA L40S": 142,
            "NVIDIA GeForce RTX 4090": 128}
# Shared memory per block (bytes): Hopper 227 KiB, A100 163 KiB, Ada 99 KiB.
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024}


def Problem(family: str, op: str = "attention", **kw):
    """A problem of this table: attention.testing.Problem (the package's one problem description) with
    this file's defaults, a 32K causal context; ``op`` "select" / "indexer" reads H, Dqk, K as Hi, Di, k.
    ``kv_quant`` ("fp8" / "int8"): attention, a quantized kv (and separate v) with tile scales of
    ``scale_block`` columns; selection, q_idx and k_idx with scales and key windows."""
    from attention.testing import Problem as problem

    return problem(family, op=op, **{"context": 32768, "causal": True, **kw})


PROBLEMS = {p.family: p for p in [
    # DeepSeek-V3.2 sparse MLA: decode at 64 x 1 and 4 x 1 tokens (different split plans), prefill.
    Problem("dsv32-decode-64", "attention", batch=64, q_per_seq=1, sink=True),
    Problem("dsv32-decode-4", "attention", batch=4, q_per_seq=1),
    Problem("dsv32-prefill", "attention", batch=1, q_per_seq=4096, context=4096, page_size=0),
    # Separate-v decode with 128 heads and 256-wide values: the general kernel (the one triton.autotune
    # prunes by the shared-memory estimate) at the shipped H200 tile, 64 heads x 256 value columns.
    Problem("separate-v-decode", "attention", batch=64, q_per_seq=1, Dqk=256, Dv=256, latent=False),
    # NSA selected-block branch: GQA 16, D=128, separate v, blocks of 64.
    Problem("nsa-prefill", "attention", batch=1, q_per_seq=4096, context=4096, H=64, Hkv=4, Dqk=128, Dv=128, K=16,
            block_size=64, page_size=0, latent=False),
    # DeepSeek-V3.2 lightning indexer (Hi=64, Di=128) and fused top-2048 over 128K, decode and prefill.
    Problem("dsv32-indexer", "indexer", batch=1, q_per_seq=128, context=131072, H=64, Dqk=128, page_size=0),
    Problem("dsv32-select-decode", "select", batch=1, q_per_seq=4, context=131072, H=64, Dqk=128, page_size=0),
    Problem("dsv32-select-prefill", "select", batch=1, q_per_seq=512, context=131072, H=64, Dqk=128, page_size=0),
    # The largest k the Triton select takes (MAX_K): a 4096-key sort network per program.
    Problem("select-k4096", "select", batch=1, q_per_seq=4, context=131072, H=64, Dqk=128, K=4096, page_size=0),
    # Quantized caches: FlashMLA's FP8 decode (the latent kernel, 576 e4m3 columns), the
    # INT8 ("C8") split decode, and an FP8 separate-v decode (the general kernel dequantizing k and v).
    Problem("dsv32-decode-64-fp8", "attention", batch=64, q_per_seq=1, sink=True, kv_quant="fp8"),
    Problem("dsv32-decode-4-int8", "attention", batch=4, q_per_seq=1, kv_quant="int8"),
    Problem("separate-v-decode-fp8", "attention", batch=64, q_per_seq=1, Dqk=256, Dv=256, latent=False,
            kv_quant="fp8"),
    # The serving engines' indexer: DeepGEMM-style fp8 / int8 inputs with scales and windows.
    Problem("dsv32-indexer-fp8", "indexer", batch=1, q_per_seq=128, context=131072, H=64, Dqk=128, page_size=0,
            kv_quant="fp8"),
    Problem("dsv32-select-decode-fp8", "select", batch=1, q_per_seq=4, context=131072, H=64, Dqk=128, page_size=0,
            kv_quant="fp8"),
    Problem("dsv32-select-prefill-int8", "select", batch=1, q_per_seq=512, context=131072, H=64, Dqk=128,
            page_size=0, kv_quant="int8"),
]}


def _sm_count(family: str) -> int:
    """SMs (or, for an Ascend SoC, AI cores) of a family: this file's table, else the launcher's."""
    if family in SM_COUNT:
        return SM_COUNT[family]
    from attention.backends.triton import launch

    return next(n for key, n in launch.SM_COUNTS if key in family)


def _launches(problem: Problem, family: str, override: Optional[Dict] = None) -> List[tuple]:
    """[(jit function, args, kwargs)] that the launcher starts for ``problem`` planned for ``family``
    (with ``override`` replacing config keys of an attention problem)."""
    from triton.runtime.jit import JITFunction

    import attention
    from attention.backends.triton import launch

    recorded = []

    def record(self, *args, grid, warmup, **kwargs):
        recorded.append((self, args, kwargs))

    saved_run = JITFunction.run
    saved_env = os.environ.get("ATTENTION_TRITON_TARGET")
    JITFunction.run = record
    os.environ["ATTENTION_TRITON_TARGET"] = family
    saved_name = launch.device_name
    if not hasattr(launch, "TARGET_ENV"):  # a launcher without target planning: name the device at least
        launch.device_name = lambda device: family
    try:
        if problem.op == "attention":
            launch.forward(attention.validate(**_attention_meta_args(problem)), override=override)
        else:
            _run_selection(problem, family)
    finally:
        JITFunction.run = saved_run
        launch.device_name = saved_name
        if saved_env is None:
            os.environ.pop("ATTENTION_TRITON_TARGET", None)
        else:
            os.environ["ATTENTION_TRITON_TARGET"] = saved_env
    return recorded


def _attention_meta_args(problem: Problem) -> Dict:
    """``selective_attention``'s arguments for an attention problem, as meta tensors (shapes only)."""
    import torch

    from attention.testing import QUANT_DTYPES_BY_NAME

    dt, m, T = problem.torch_dtype, "meta", problem.T
    q = torch.empty(T, problem.H, problem.Dqk, device=m, dtype=dt)
    args = dict(q=q, indices=torch.empty(T, problem.Hkv, problem.K, device=m, dtype=torch.int32),
                causal=problem.causal, block_size=problem.block_size)
    seqs = torch.empty(problem.batch + 1, device=m, dtype=torch.int32)
    if problem.page_size:
        pages = -(-problem.context // problem.page_size) * problem.batch
        kv = torch.empty(pages, problem.page_size, problem.Hkv, problem.Dqk, device=m, dtype=dt)
        args.update(kv=kv, block_table=torch.empty(problem.batch, pages // problem.batch, device=m,
                                                   dtype=torch.int32),
                    seqlens_k=torch.empty(problem.batch, device=m, dtype=torch.int32), cu_seqlens_q=seqs)
        if not problem.latent:
            args["v"] = torch.empty(pages, problem.page_size, problem.Hkv, problem.Dv, device=m, dtype=dt)
    else:
        kv = torch.empty(problem.batch * problem.context, problem.Hkv, problem.Dqk, device=m, dtype=dt)
        args["kv"] = kv
        if not problem.latent:
            args["v"] = torch.empty(kv.shape[0], problem.Hkv, problem.Dv, device=m, dtype=dt)
        if problem.batch > 1:
            args.update(cu_seqlens_q=seqs, cu_seqlens_k=seqs.clone())
    if problem.kv_quant:  # stored values and float32 tile scales
        qdt, sb = QUANT_DTYPES_BY_NAME[problem.kv_quant], problem.scale_block
        for name in ("kv",) if problem.latent else ("kv", "v"):
            x = args[name]
            args[name] = torch.empty(x.shape, device=m, dtype=qdt)
            args[name + "_scale"] = torch.empty(
                x.shape[:-1] + (-(-x.shape[-1] // sb),), device=m, dtype=torch.float32)
        args["scale_block"] = sb
    if problem.latent:
        args["d_v"] = problem.Dv
    if problem.Dr:  # the split rope part (q_rope / kv_rope), shaped like q and the cache
        args["q_rope"] = torch.empty(T, problem.H, problem.Dr, device=m, dtype=dt)
        args["kv_rope"] = torch.empty(*kv.shape[:-1], problem.Dr, device=m, dtype=dt)
    if problem.sink:
        args["attn_sink"] = torch.empty(problem.H, device=m, dtype=torch.float32)
    return args


def _run_selection(problem: Problem, family: str) -> None:
    """Launch a selection problem ("select" / "indexer") on meta tensors with the split count the
    backend picks on a GPU of ``family``."""
    import torch

    from attention.backends.triton.selection import LAUNCHER as SELECTION_LAUNCHER
    from attention.selection import validate_selection
    from attention.testing import QUANT_DTYPES_BY_NAME

    m, T = "meta", problem.T
    sdt = QUANT_DTYPES_BY_NAME[problem.kv_quant] if problem.kv_quant else problem.torch_dtype
    q = torch.empty(T, problem.H, problem.Dqk, device=m, dtype=sdt)
    k = torch.empty(problem.context, problem.Dqk, device=m, dtype=sdt)
    w = torch.empty(T, problem.H, device=m, dtype=torch.float32)
    extra = {}
    if problem.kv_quant:
        extra = dict(q_idx_scale=torch.empty(T, problem.H, device=m), k_idx_scale=torch.empty(problem.context, device=m),
                     cu_seqlen_ks=torch.empty(T, device=m, dtype=torch.int32),
                     cu_seqlen_ke=torch.empty(T, device=m, dtype=torch.int32))
    op = "lightning_indexer" if problem.op == "indexer" else "select"
    inp = validate_selection(op, q, k, w, problem.K if op == "select" else 0, max_seqlen_k=problem.context,
                             **extra)
    # The split count the backend picks on a GPU of this family (meta tensors have no SMs).
    chunks = -(-problem.context // (1 << max(0, problem.K - 1).bit_length()))
    saved_splits = SELECTION_LAUNCHER.splits_override
    SELECTION_LAUNCHER.splits_override = max(1, min(-(-2 * _sm_count(family) // T), chunks // 2))
    try:
        SELECTION_LAUNCHER.run(inp)
    finally:
        SELECTION_LAUNCHER.splits_override = saved_splits


def _resources(cubin: bytes) -> Dict[str, Optional[int]]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(regs=int(m.group(1)), stack=int(m.group(2))) if m else dict(regs=None, stack=None)


def compile_launch(fn, args, kwargs, arch: int):
    """triton.compile of one recorded launch with the JIT's own specialization (JITFunction.run, minus
    the driver): returns the compiled kernel and the constexprs it was specialised with."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what this triton's run() adds
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    names = {(i,): n for i, n in enumerate(fn.arg_names)}
    consts = {names[k]: v for k, v in constexprs.items() if k in names}
    return kernel, consts, options


def budget(families: List[str], problems: List[str]):
    """Yield one dict per distinct compiled kernel."""
    import triton

    from attention.backends.triton import launch

    seen = {}
    for family in families:
        arch = ARCH[family]
        for pname in problems:
            p = PROBLEMS[pname]
            for fn, args, kwargs in _launches(p, family):
                t0 = time.time()
                kernel, consts, options = compile_launch(fn, args, kwargs, arch)
                key = (arch, kernel.hash)
                if key in seen:  # the same specialization as an earlier problem's
                    seen[key]["problems"].append(pname)
                    continue
                row = dict(family=family, arch=f"sm_{arch}", kernel=fn.__name__, problems=[pname],
                           triton=triton.__version__, num_warps=options.num_warps, num_stages=options.num_stages,
                           shared=kernel.metadata.shared, max_shared=MAX_SHARED[arch],
                           config={k: v for k, v in consts.items() if k.startswith("BLOCK") or k.isupper()},
                           compile_s=round(time.time() - t0, 1), **_resources(kernel.asm["cubin"]))
                if fn.__name__ == "selective_attention_fwd_kernel":  # the kernel the estimate models
                    import torch

                    elem = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
                    row["smem_estimate"] = launch.smem_estimate(
                        dict(BLOCK_N=consts["BLOCK_N"], BLOCK_D=consts["BLOCK_D"], num_stages=options.num_stages),
                        consts["BLOCK_H"], consts["BLOCK_DV"], elem.element_size())
                seen[key] = row
                yield row


def format_table(rows) -> str:
    head = ["family", "arch", "kernel", "problems", "warps", "stages", "regs", "stack (spill)", "shared", "estimate"]
    lines = [head]
    for r in rows:
        lines.append([r["family"], r["arch"], r["kernel"], ",".join(r["problems"]), str(r["num_warps"]),
                      str(r["num_stages"]), str(r["regs"]), str(r["stack"]), f"{r['shared'] / 1024:.1f} KiB",
                      f"{r['smem_estimate'] / 1024:.1f} KiB" if r.get("smem_estimate") is not None else "-"])
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join(" | ".join(c.ljust(w[i]) for i, c in enumerate(x)) for x in lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", action="append", choices=sorted(ARCH))
    ap.add_argument("--problem", action="append", choices=sorted(PROBLEMS))
    ap.add_argument("--jsonl", action="store_true", help="one JSON line per compiled kernel (no table)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_budget: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, said out loud
    rows = []
    t0 = time.time()
    for row in budget(a.family or ["NVIDIA H200"], a.problem or list(PROBLEMS)):
        rows.append(row)
        if a.jsonl:
            print(json.dumps(row), flush=True)
        else:
            print(f"  {row['arch']} {row['kernel']} {','.join(row['problems'])}: {row['regs']} regs, "
                  f"stack {row['stack']}, shared {row['shared']} ({row['compile_s']} s)", file=sys.stderr, flush=True)
    if not a.jsonl:
        print(format_table(rows))
        print(f"{len(rows)} kernels in {time.time() - t0:.0f} s")
    bad = [r for r in rows if r["stack"] or r["shared"] > r["max_shared"]
           or (r.get("smem_estimate") is not None and r["smem_estimate"] < r["shared"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
