"""Our Triton kernels compiled for Ascend by triton-ascend, checked through memory planning (docs/ascendc.md).

    python bench/triton_ascend_check.py [--soc Ascend910B2]... [--problem NAME]... [--out DIR] [--jobs N] [--jsonl]

Runs in an environment whose ``triton`` is Huawei's triton-ascend (3.2) with the ``ascendnpu-ir`` wheel
(``bishengir-compile``); ``make triton-ascend-check`` builds one (.venv-triton-ascend) and runs this.
Nothing here needs an NPU or CANN, and nothing here runs a kernel: it is a compile check.

What is compiled is what the launchers start: each problem runs through the package's own launchers
(forward, combine, merge, selection, backward) on ``meta`` tensors planned for the SoC
(``ATTENTION_TRITON_TARGET=<soc>``: its shipped record in attention/tuning/triton_defaults.json), while
``JITFunction.run`` records every launch (bench/compile_budget.py's recorder). Each recorded launch is
bound by triton-ascend's own JIT binder (the specialization a real launch would get), lowered to TTIR
and Linalg by triton-ascend's stages, and handed to ``bishengir-compile`` with the options
triton-ascend uses for A2/A3 plus ``--save-temps``. The pipeline runs through HIVM: UB/L1 memory
planning, injected set_flag/wait_flag, the cube/vector split; it stops at the last step, ``hivmc``
(part of CANN, absent here). A kernel passes when the only error is that missing ``hivmc`` and the
saved HIVM IR (module.hivm.opt.mlir) holds planned buffers that fit the chip's UB and L1.

Reported per kernel and SoC: planned UB and L1 bytes (the highest ``offset + size`` over the planned
buffers, ``hivm.hir.pointer_cast``) against the chip's sizes (read from the same IR's target spec),
the core type (aiv / aic / mix), and for the gathering kernels whether a scalar loop over the
feature dimension sits inside the candidate loop. Any compile error, overflow or
scalar feature loop in a gather fails the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SOCS = ("Ascend910B2", "Ascend910B4", "Ascend910_9391")

# ---------------------------------------------------------------- reading the saved HIVM IR
# (pure text functions: tests/test_triton_ascend_check.py runs them without triton-ascend)

# Bytes per element of the MLIR element types our kernels produce.
_ELEM_BYTES = {"i1": 1, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
               "index": 8}
# Memory spaces of the HIVM IR and the target-spec entry that holds their size (in bits).
SPACES = {"ub": "UB_SIZE", "cbuf": "L1_SIZE", "ca": "L0A_SIZE", "cb": "L0B_SIZE", "cc": "L0C_SIZE"}

_CONST = re.compile(r"(%[\w.$-]+)\s*=\s*arith\.constant\s+(-?\d+)\s*:\s*(?:i64|i32|index)\b")
_PTR_CAST = re.compile(r"hivm\.hir\.pointer_cast\(([^)]*)\)[^:\n]*:\s*memref<(.*?)#hivm\.address_space<(\w+)>>")
_SPEC = re.compile(r'#dlti\.dl_entry<"(\w+)",\s*(\d+)\s*:\s*i\d+>')
_OVERFLOW = re.compile(r"(\w+) overflow, requires (\d+) bits while (\d+) bits? available", re.IGNORECASE)


def chip_sizes(hivm: str) -> Dict[str, int]:
    """{space: bytes} of the target the IR was planned for (its dlti target-system spec)."""
    spec = {k: int(v) for k, v in _SPEC.findall(hivm)}
    return {space: spec[key] // 8 for space, key in SPACES.items() if key in spec}


def _memref_bytes(body: str) -> int:
    """Bytes of a static memref type body such as ``2x64x512xf32, strided<...>, ``."""
    shape = body.split(",")[0].strip()
    parts = shape.split("x")
    elem = parts[-1]
    if elem not in _ELEM_BYTES:
        raise ValueError(f"unknown element type {elem!r} in memref<{body}>")
    n = 1
    for d in parts[:-1]:
        if not d.isdigit():
            raise ValueError(f"dynamic dimension in a planned buffer: memref<{body}>")
        n *= int(d)
    return n * _ELEM_BYTES[elem]


def planned_bytes(hivm: str) -> Dict[str, int]:
    """{space: bytes} that memory planning assigned: the highest offset + size over every planned
    buffer (``hivm.hir.pointer_cast(%offset[, %offset2...]) : memref<...>``; a multi-buffered one
    lists one offset per copy). Offsets are the constants the planner materialised."""
    consts = {name: int(val) for name, val in _CONST.findall(hivm)}
    used: Dict[str, int] = {}
    for args, body, space in _PTR_CAST.findall(hivm):
        offsets = []
        for a in (x.strip() for x in args.split(",") if x.strip()):
            if a not in consts:
                raise ValueError(f"planned buffer offset {a} is not a constant (memory planning did not run?)")
            offsets.append(consts[a])
        if not offsets:
            continue
        end = max(offsets) + _memref_bytes(body)
        used[space] = max(used.get(space, 0), end)
    return used


def overflows(log: str) -> List[Tuple[str, int, int]]:
    """(memory, required bytes, available bytes) of every overflow the compiler reported."""
    return [(m.lower(), int(req) // 8, int(avail) // 8) for m, req, avail in _OVERFLOW.findall(log)]


def reached_hivmc(log: str) -> bool:
    """The pipeline ran to its last step: only the external ``hivmc`` (CANN) was missing."""
    return "External hivmc run fails" in log or "Cannot find hivmc" in log


_FOR = re.compile(r"^(\s*)(?:%[\w:#]+\s*=\s*)?scf\.for\s+(%[\w]+)\s*=\s*(%[\w]+)\s+to\s+(%[\w]+)\s+step\s+(%[\w]+)")


def _loops(hivm: str):
    """[(indent, start line, end line, header)] of every scf.for, ends found by indentation."""
    lines = hivm.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = _FOR.match(line)
        if not m:
            continue
        ind = len(m.group(1))
        end = i + 1
        while end < len(lines):
            s = lines[end]
            if s.strip() and len(s) - len(s.lstrip()) <= ind:
                break
            end += 1
        out.append(dict(indent=ind, start=i, end=end, var=m.group(2), lo=m.group(3), hi=m.group(4), step=m.group(5)))
    return lines, out


_SCALAR_GM_FLOAT_LOAD = re.compile(r"memref\.load\s+%[\w.]+\[.*:\s*memref<(?:1x)+(?:f16|bf16|f32)\b.*"
                                   r"#hivm\.address_space<gm>>\s*$")


def scalar_feature_loops(hivm: str, feature_widths: Iterable[int]) -> List[str]:
    """Scalar loops over a feature dimension nested inside another loop (the candidate loop).

    A vectorised gather is a loop over the candidate rows whose body copies a whole row
    (``load_gm_to_ubuf_1d_*`` of the row's width). The scalar form walks the head width one element
    at a time: an ``scf.for`` with step 1 over a feature width (a BLOCK_D-like tile width of the
    launch) whose body, nested loops included, loads single floating-point elements from global
    memory (``memref.load`` of a ``memref<1xbf16, ... gm>``). Integer scalar loads (indices, block
    table entries) are the candidate bookkeeping, not the gather. Returns one line per such loop."""
    widths = {int(w) for w in feature_widths if int(w) > 1}
    lines, loops = _loops(hivm)
    consts = {name: int(val) for name, val in _CONST.findall(hivm)}
    bad = []
    for lp in loops:
        if consts.get(lp["step"]) != 1 or lp["lo"] not in consts or lp["hi"] not in consts:
            continue
        trip = consts[lp["hi"]] - consts[lp["lo"]]
        if trip not in widths:
            continue
        if not any(o["start"] < lp["start"] < o["end"] for o in loops if o is not lp):
            continue  # not inside another loop
        body = lines[lp["start"] + 1:lp["end"]]
        if any(_SCALAR_GM_FLOAT_LOAD.search(x) for x in body):
            bad.append(f"line {lp['start'] + 1}: scalar loop over {trip} feature columns "
                       f"({lines[lp['start']].strip()[:80]})")
    return bad


# ---------------------------------------------------------------- compiling (needs triton-ascend)

def triton_ascend_version() -> Optional[str]:
    """triton-ascend's version when it is the installed triton, else None."""
    try:
        from importlib.metadata import version

        return version("triton-ascend")
    except Exception:
        return None


def bishengir_compile() -> Path:
    import ascendnpuir

    return Path(ascendnpuir.__file__).parent / "bin" / "bishengir-compile"


def bishengir_flags(soc: str, options) -> List[str]:
    """The options triton-ascend's A2/A3 stage (linalg_to_bin_enable_npu_compile_A2_A3) passes for these
    kernel options, so memory planning sees what a real compile would (multi-buffering included)."""
    flags = [f"--target={soc}"]
    if options.multibuffer is not None:
        flags.append(f"--enable-auto-multi-buffer={str(options.multibuffer).lower()}")
    if options.enable_auto_bind_sub_block is not None:
        flags.append(f"--enable-auto-bind-sub-block={str(options.enable_auto_bind_sub_block).lower()}")
    return flags + ["--enable-hfusion-compile=true", "--enable-hivm-compile=true", "--enable-triton-kernel-compile=true"]


def launch_key(fn, args, kwargs) -> str:
    """What a launch's Linalg depends on: the kernel, its arguments' JIT specialization and the options
    (the binder's cache key, as JITFunction.run forms it)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("npu", SOCS[0], 0))
    kwargs = dict(kwargs, debug=kwargs.get("debug", False))
    _, sig_and_spec, constexpr_vals, _, excess = create_function_from_signature(fn.signature, fn.params,
                                                                                backend)(*args, **kwargs)
    return f"{fn.__name__}|{fn.cache_key}|{''.join(sig_and_spec)}|{constexpr_vals}|{sorted(excess.items())}"


def lower_launch(fn, args, kwargs, soc: str):
    """(Linalg text, metadata, options) of one recorded launch: triton-ascend's JIT binder (the
    specialization JITFunction.run would give it), then its ttir and ttadapter stages."""
    from triton._C.libtriton import ir
    from triton.backends.ascend import compiler as ascend
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("npu", soc, 0)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", False)
    bound, sig_and_spec, _, _, _ = binder(*args, **kwargs)
    options = backend.parse_options(kwargs)
    bound_vals = tuple(bound.values())
    sigkeys = [p.name for p in fn.params if not p.is_constexpr]
    signature = {k: ("*i8" if v == "none" else v) for k, v in zip(sigkeys, sig_and_spec[:len(sigkeys)])}
    attrs = backend.get_attrs_descriptor(fn.params, bound_vals)
    const_params = attrs.get_constants()
    constants = {p.name: v for v, p in zip(bound_vals, fn.params)
                 if p.is_constexpr or p.num in const_params or v is None}
    src = ASTSource(fn, signature, constants, attrs)
    metadata = {"hash": src.hash(), "target": target, **options.__dict__}
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    mod = src.make_ir(options, backend.get_codegen_implementation(), backend.get_module_map(), ctx)
    mod = ascend.make_ttir(mod, metadata, options)
    linalg = ascend.ttir_to_linalg(mod, metadata, options, named_ops=True)
    linalg, metadata = ascend._parse_linalg_metadata(linalg, metadata)
    consts = {p.name: v for v, p in zip(bound_vals, fn.params) if p.is_constexpr}
    return linalg, metadata, options, consts


def feature_widths(config: Dict) -> List[int]:
    """The feature-dimension tile widths of a launch (BLOCK_D, BLOCK_DV, BLOCK_DR, BLOCK_DT, BLOCK_DK).
    The rope chunk BLOCK_DR only when the launch has a rope part (DR > 0): otherwise no loop walks it,
    and a loop of that trip count is another one (e.g. the per-row scale loads of a quantized tile
    when BLOCK_N equals it)."""
    return sorted({int(v) for k, v in config.items() if k.startswith("BLOCK_D") and isinstance(v, int)
                   and not (k == "BLOCK_DR" and config.get("DR", 1) == 0)})


def classify(log: str, hivm: Optional[str], widths: Iterable[int]) -> Dict:
    """The verdict on one bishengir-compile run from its output and saved HIVM IR (None: not saved).

    ok: the pipeline reached hivmc (the only error is that CANN's hivmc is absent), planning fit the
    chip, no scalar feature loop, and the compiler did not have to turn multi-buffering off to fit.
    Anything else fails: "overflow" (the compiler's diagnostic, or planned bytes above the chip's),
    "retried" (it fit only after the compiler disabled multi-buffering / code motion by itself),
    "scalar-gather", or "error"."""
    over = overflows(log)
    if over:
        return dict(status="overflow", overflow=[dict(memory=m, required=q, available=a) for m, q, a in over])
    if not reached_hivmc(log) or hivm is None:
        return dict(status="error", stage="bishengir-compile")
    res = dict(planned=planned_bytes(hivm), chip=chip_sizes(hivm))
    too_big = [sp for sp, n in res["planned"].items() if n > res["chip"].get(sp, n)]
    if too_big:
        return dict(res, status="overflow", overflow=[dict(memory=sp, required=res["planned"][sp],
                                                           available=res["chip"][sp]) for sp in too_big])
    if _RETRY.search(log):
        return dict(res, status="retried", retried=_RETRY.findall(log))
    loops = scalar_feature_loops(hivm, widths)
    if loops:
        return dict(res, status="scalar-gather", scalar_loops=loops)
    return dict(res, status="ok")


# Kernels known not to compile for Ascend, with the diagnostic that says why (docs/triton.md "Ascend").
# Such a kernel is reported as "known-fail" and does not fail the check; if it stops failing, or fails
# another way, the check fails (a strict expected failure: the entry must then be removed or revised).
KNOWN_FAILURES: Dict[str, str] = {
    # Empty since the fused select's Ascend variant (selection_kernels._pair_network) replaced tl.sort of
    # packed int64 keys, which triton-ascend lowers to hivm.hir.vsort (f16/f32 only).
}


def apply_known_failures(row: Dict) -> Dict:
    """The row with a known failure marked "known-fail" (or "fixed?" when it no longer fails that way)."""
    why = KNOWN_FAILURES.get(row["kernel"])
    if why is None:
        return row
    if row["status"] != "ok" and why in (row.get("log") or ""):
        return dict(row, status="known-fail", known=why)
    return dict(row, status="unexpected", known=why,
                note="listed in KNOWN_FAILURES but did not fail that way: revise the list and docs/triton.md")


_RETRY = re.compile(r"automatically set ([\w-]+) to false and retrying")


def run_bishengir(linalg: str, soc: str, options, workdir: Path, timeout: int) -> Tuple[str, Optional[str]]:
    """(compiler output, saved HIVM IR or None) of bishengir-compile on one kernel's Linalg."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "kernel.ttadapter.mlir"
    src.write_text(linalg)
    temps = workdir / "temps"
    if temps.exists():  # a previous run's IR must not be read as this one's
        for f in temps.iterdir():
            f.unlink()
    cmd = [str(bishengir_compile()), str(src), *bishengir_flags(soc, options), f"--save-temps={temps}",
           "-o", str(workdir / "kernel")]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log = r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        return f"bishengir-compile timed out after {timeout} s", None
    (workdir / "bishengir.log").write_text(log)
    hivm = temps / "module.hivm.opt.mlir"
    return log, hivm.read_text() if hivm.exists() else None


# ---------------------------------------------------------------- what is compiled

@dataclasses.dataclass(frozen=True)
class AscendProblem:
    """A launch set: an attention / selection problem of bench/compile_budget.py, a backward, or a merge."""
    name: str
    kind: str  # "forward" (compile_budget.PROBLEMS entry or extra) | "backward" | "merge"
    base: str = ""  # compile_budget problem name (kind "forward")
    deterministic: bool = False  # backward: the dkv kernel of ATTENTION_DETERMINISTIC=1


def _extra_problems():
    from bench.compile_budget import Problem

    return {p.family: p for p in [
        # One decode token: 8 programs of 16 heads on 20-24 AI cores, so the candidates are split and
        # the combine kernel runs (64 x 1 tokens fill the cores without a split).
        Problem("dsv32-decode-1", "attention", batch=1, q_per_seq=1, sink=True),
        # The general kernel at DeepSeek widths with the split rope part (separate V, Dqk 512
        # + rope 64, Dv 512; its 64-wide rope chunk overflowed UB): its rope chunk loop is sized by BLOCK_DR.
        Problem("rope-general-decode", "attention", batch=64, q_per_seq=1, Dqk=512, Dr=64, Dv=512, latent=False),
        # Quantized caches as Ascend runs them: the general kernel dequantizing int8 k and v
        # (tile scales of 128 columns).
        Problem("separate-v-decode-int8", "attention", batch=64, q_per_seq=1, Dqk=256, Dv=256, latent=False,
                kv_quant="int8"),
        # The serving engines' int8 indexer inputs with scales and key windows.
        Problem("dsv32-indexer-int8", "indexer", batch=1, q_per_seq=128, context=131072, H=64, Dqk=128, page_size=0,
                kv_quant="int8"),
    ]}


PROBLEMS = [
    AscendProblem("dsv32-decode-64", "forward", "dsv32-decode-64"),  # latent kernel, sink, paged
    AscendProblem("dsv32-decode-1", "forward", "dsv32-decode-1"),  # latent kernel split + combine
    AscendProblem("dsv32-prefill", "forward", "dsv32-prefill"),  # latent, contiguous, causal
    AscendProblem("rope-general-decode", "forward", "rope-general-decode"),  # general kernel + rope loop
    AscendProblem("nsa-prefill", "forward", "nsa-prefill"),  # general kernel, blocks of 64, GQA
    # The general kernel dequantizing int8 k and v. The latent kernel over an int8 cache (a
    # dsv32-decode-64 with kv_quant="int8", tried 2026-11-29) overflowed the UB (275.2 KiB, after 1068 s
    # of bishengir-compile) and is declined on npu (backend.limit_reasons).
    AscendProblem("separate-v-decode-int8", "forward", "separate-v-decode-int8"),
    AscendProblem("dsv32-indexer-int8", "forward", "dsv32-indexer-int8"),
    AscendProblem("dsv32-indexer", "forward", "dsv32-indexer"),
    # The fused select's Ascend variant (pair network, k = 2048): decode splits the keys over the AI
    # cores (packed keys out, SPLITS > 1), prefill runs one program per token (positions out).
    # Not compiled, declined on npu instead (selection.limit_reasons): select-k4096 (264 KiB of UB) and
    # dsv32-select-prefill-int8 (209.6 KiB with the records' 32-position tiles, 190.2 KiB with 16).
    AscendProblem("dsv32-select-decode", "forward", "dsv32-select-decode"),
    AscendProblem("dsv32-select-prefill", "forward", "dsv32-select-prefill"),
    AscendProblem("merge-states", "merge"),
    AscendProblem("dsv32-backward", "backward"),
    AscendProblem("dsv32-backward-deterministic", "backward", deterministic=True),
]
PROBLEM_NAMES = [p.name for p in PROBLEMS]


def _recording():
    """Context manager: JITFunction.run records (fn, args, kwargs) instead of launching."""
    import contextlib

    from triton.runtime.jit import JITFunction

    @contextlib.contextmanager
    def rec():
        recorded = []
        saved = JITFunction.run
        JITFunction.run = lambda self, *a, grid, warmup, **k: recorded.append((self, a, k))
        try:
            yield recorded
        finally:
            JITFunction.run = saved

    return rec()


def launches(problem: AscendProblem, soc: str) -> List[tuple]:
    """[(jit function, args, kwargs)] the package's launchers start for ``problem`` planned for ``soc``."""
    import torch

    import attention
    from bench import compile_budget

    if problem.kind == "forward":
        base = compile_budget.PROBLEMS.get(problem.base) or _extra_problems()[problem.base]
        return compile_budget._launches(base, soc)
    m, dt = "meta", torch.bfloat16
    if problem.kind == "merge":  # merge_attention_states: 4 context-parallel parts of DeepSeek decode
        from attention.backends.triton.merge import launch_merge

        N, T, H, Dv = 4, 64, 128, 512
        with _recording() as rec:
            launch_merge(torch.empty(N, T, H, Dv, device=m, dtype=dt), torch.empty(N, T, H, device=m),
                         torch.empty(H, device=m), torch.empty(T, H, Dv, device=m, dtype=dt),
                         torch.empty(T, H, device=m))
        return rec
    # backward: DeepSeek prefill (latent 576 / 512, 128 heads, MQA, paged, causal, top-2048)
    from attention.backends.triton import backward as bwd

    T, H, L, page = 256, 128, 4096, 64
    inp = attention.validate(q=torch.empty(T, H, 576, device=m, dtype=dt),
                             kv=torch.empty(L // page, page, 1, 576, device=m, dtype=dt),
                             indices=torch.empty(T, 1, 2048, device=m, dtype=torch.int32), d_v=512, causal=True,
                             block_table=torch.empty(1, L // page, device=m, dtype=torch.int32),
                             seqlens_k=torch.empty(1, device=m, dtype=torch.int32))
    out = torch.empty(T, H, 512, device=m, dtype=dt)
    lse = torch.empty(T, H, device=m)
    saved = os.environ.get("ATTENTION_TRITON_TARGET")
    os.environ["ATTENTION_TRITON_TARGET"] = soc
    try:
        with _recording() as rec:
            bwd.backward(inp, out, lse, torch.empty_like(out), torch.empty_like(lse),
                         deterministic_mode=problem.deterministic)
    finally:
        if saved is None:
            os.environ.pop("ATTENTION_TRITON_TARGET", None)
        else:
            os.environ["ATTENTION_TRITON_TARGET"] = saved
    if problem.deterministic:  # the first kernel is the atomics problem's with row writes instead
        rec = [r for r in rec if r[0].__name__ == "selective_attention_bwd_dkv_kernel"]
    return rec


# ---------------------------------------------------------------- the check

def _kib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KiB"


def format_table(rows: List[Dict]) -> str:
    head = ["soc", "kernel", "problems", "core", "status", "UB planned / chip", "L1 planned / chip", "tile", "s"]
    lines = [head]
    for r in rows:
        pl, ch = r.get("planned", {}), r.get("chip", {})
        if r["status"] == "overflow" and not pl:
            ub = " ".join(f"{o['memory']} needs {_kib(o['required'])} / {_kib(o['available'])}" for o in r["overflow"])
            l1 = "-"
        elif not pl:  # stopped before memory planning (an error, a known failure)
            ub = l1 = "-"
        else:
            ub = f"{_kib(pl.get('ub', 0))} / {_kib(ch.get('ub'))}"
            l1 = f"{_kib(pl.get('cbuf', 0))} / {_kib(ch.get('cbuf'))}"
        tile = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in sorted(r.get("config", {}).items())
                        if k in ("BLOCK_H", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "BLOCK_DR", "BLOCK_DK", "K_PAD"))
        tile += " rows" if r.get("config", {}).get("GATHER_ROWS") else ""
        lines.append([r["soc"], r["kernel"], ",".join(r["problems"]), r.get("core", "-"), r["status"], ub, l1, tile,
                      str(r.get("compile_s", "-"))])
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join(" | ".join(c.ljust(w[i]) for i, c in enumerate(x)).rstrip() for x in lines)


def check(socs: List[str], problems: List[str], out: Path, jobs: int, timeout: int, progress=None):
    """Compile every launch of ``problems`` for every SoC; yields result rows as compiles finish.

    Launches that lower to the same Linalg for a SoC are compiled once (their problems are listed). The
    Linalg depends on the kernel's specialization and options, not on the SoC, so a launch another SoC
    already lowered is not lowered again; bishengir-compile runs per SoC (``--target``), ``jobs`` at a
    time, starting while later launches are still being lowered."""
    import concurrent.futures as cf
    import hashlib

    by_name = {p.name: p for p in PROBLEMS}
    lowered = {}  # launch key -> (linalg, metadata, options, consts)
    compiling = {}  # (soc, linalg hash) -> row
    futures = []

    def one(row, linalg, options, workdir):
        t0 = time.time()
        log, hivm = run_bishengir(linalg, row["soc"], options, workdir, timeout)
        row.update(classify(log, hivm, feature_widths(row["config"])), compile_s=round(time.time() - t0, 1),
                   ir=str(workdir))
        if row["status"] != "ok":
            row["log"] = log[-4000:]
        return apply_known_failures(row)

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for soc in socs:
            for pname in problems:
                for i, (fn, args, kwargs) in enumerate(launches(by_name[pname], soc)):
                    row = dict(soc=soc, kernel=fn.__name__, problems=[pname])
                    try:
                        key = launch_key(fn, args, kwargs)
                        if key not in lowered:
                            lowered[key] = lower_launch(fn, args, kwargs, soc)
                        linalg, metadata, options, consts = lowered[key]
                    except Exception as e:  # a lowering error is a compile error of the kernel
                        detail = getattr(e, "stderr", None)
                        detail = (detail.decode(errors="replace") if isinstance(detail, bytes)
                                  else f"{type(e).__name__}: {e}")
                        yield apply_known_failures(dict(row, status="error", stage="triton-ascend lowering",
                                                        log=detail[-4000:]))
                        continue
                    ckey = (soc, hashlib.sha256(linalg.encode()).hexdigest())
                    if ckey in compiling:
                        compiling[ckey]["problems"].append(pname)
                        continue
                    row.update(core=metadata["mix_mode"],
                               config={k: v for k, v in consts.items()
                                       if k.startswith("BLOCK") or k in ("K_PAD", "NUM_STAGES", "GATHER_ROWS", "DR")})
                    compiling[ckey] = row
                    futures.append(pool.submit(one, row, linalg, options, out / soc / pname / f"{i}-{fn.__name__}"))
                    if progress:
                        progress(f"lowered {soc} {pname} {fn.__name__}")
                    for fut in [f for f in futures if f.done()]:  # report compiles as they finish
                        futures.remove(fut)
                        yield fut.result()
        for fut in cf.as_completed(futures):
            yield fut.result()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--soc", action="append", choices=SOCS, help="default: all three")
    ap.add_argument("--problem", action="append", choices=PROBLEM_NAMES, help="default: all")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "triton-ascend",
                    help="kernels' Linalg, compiler logs and saved HIVM IR (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel bishengir-compile runs")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per bishengir-compile run")
    ap.add_argument("--jsonl", action="store_true", help="one JSON line per compiled kernel (no table)")
    a = ap.parse_args(argv)
    ver = triton_ascend_version()
    if not ver:
        print("triton_ascend_check: the installed triton is not triton-ascend (make triton-ascend-check builds "
              "an environment with it)", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton_ascend_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    import ascendnpuir

    log = lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"triton-ascend {ver}, ascendnpu-ir {ascendnpuir.__version__}; nothing here runs on an NPU")
    t0 = time.time()
    rows = []
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "results.jsonl", "w") as fh:
        for row in check(a.soc or list(SOCS), a.problem or PROBLEM_NAMES, a.out, a.jobs, a.timeout, log):
            rows.append(row)
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            if a.jsonl:
                print(json.dumps(row), flush=True)
            else:
                pl = row.get("planned", {})
                log(f"{row['soc']} {row['kernel']} {','.join(row['problems'])}: {row['status']}, UB "
                    f"{pl.get('ub', '-')} B, L1 {pl.get('cbuf', '-')} B ({row.get('compile_s', '-')} s)")
                if row["status"] not in ("ok", "known-fail"):
                    log("    " + "\n    ".join((row.get("log") or "").strip().splitlines()[-6:]))
                    for x in row.get("scalar_loops", []):
                        log(f"    {x}")
    order = {s: i for i, s in enumerate(SOCS)}
    rows.sort(key=lambda r: (order.get(r["soc"], 9), PROBLEM_NAMES.index(r["problems"][0]), r["kernel"]))
    bad = [r for r in rows if r["status"] not in ("ok", "known-fail")]
    known = [r for r in rows if r["status"] == "known-fail"]
    if not a.jsonl:
        print(format_table(rows))
        print(f"{len(rows)} kernel compiles for {len(a.soc or SOCS)} SoCs in {time.time() - t0:.0f} s; "
              f"{len(bad)} failed, {len(known)} known failures ({', '.join(sorted({r['kernel'] for r in known})) or '-'}: "
              f"KNOWN_FAILURES). Compiled to the end of memory planning (hivmc, from CANN, not run); "
              f"nothing ran on an NPU.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
