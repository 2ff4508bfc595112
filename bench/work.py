"""Count the work the Triton kernels execute, on the CPU: ``python -m bench.work --target "NVIDIA H200"
--preset dsv32-decode|dsv32-prefill|nsa-prefill|tiny [--json PATH]``.

The Triton backend runs under the interpreter (``TRITON_INTERPRET=1``) with the launch plan of the
named GPU (``ATTENTION_TRITON_TARGET``: that device's shipped/tuned config and SM count), and the
interpreter itself is instrumented, not our kernels: :class:`WorkCounter` wraps the interpreter
builder's ``create_dot`` (every ``tl.dot``: 2*M*N*K FLOPs, counted whatever the mask) and
``create_masked_load`` (every ``tl.load``: the bytes of the elements whose mask is true, which is
what a GPU fetches), and attributes each loaded address to the tensor whose storage holds it.

Reported against the contract's useful work (bench/problems.py's model): useful FLOPs
2 * kept * hg * (Dqk + Dr + Dv); compulsory bytes: each query token's selected rows once (per kv
head), q once, out once. Shapes are scaled-down DeepSeek/NSA shapes with the tile ratios kept (the
heads, widths and BLOCK sizes of the real plan; K a multiple of BLOCK_N; the same K / context ratio
for the causal prefill): the ratios, not the absolute counts, are what carries over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from typing import Dict, List, Optional

# The interpreter is chosen when triton is first imported: set it before anything imports triton.
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .presets import dsv32, nsa  # noqa: E402
from .problems import Case, flop_count, kept_candidates, make_inputs  # noqa: E402


class WorkCounter:
    """Instrument Triton's interpreter while active (a context manager): FLOPs of every ``tl.dot``
    and bytes of every ``tl.load``, per tensor. Works for any kernel run by the interpreter.

    ``tensors``: {name: tensor} whose storage ranges name the loaded bytes; a load from any other
    storage is attributed to the kernel parameter it was passed as (or "other")."""

    def __init__(self, tensors: Optional[Dict[str, torch.Tensor]] = None):
        self.flops = 0
        self.dots = 0
        self.bytes: Counter = Counter()
        self._named = dict(tensors or {})
        self._ranges: List = []  # (start, end, name), rebuilt per launch
        self._saved = []
        self._patched = set()

    @staticmethod
    def _span(t: torch.Tensor):
        st = t.untyped_storage()
        return st.data_ptr(), st.data_ptr() + st.nbytes()

    def _set_launch_ranges(self, params: Dict[str, object]):
        ranges, seen = [], set()
        for name, t in list(self._named.items()) + list(params.items()):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                s, e = self._span(t)
                if s not in seen:  # the first name wins for a storage passed twice (dummies)
                    seen.add(s)
                    ranges.append((s, e, name))
        ranges.sort()
        self._ranges = ranges
        self._starts = np.array([r[0] for r in ranges], dtype=np.uint64)

    def _attribute(self, addrs: np.ndarray, elem: int):
        if addrs.size == 0:
            return
        if not self._ranges:
            self.bytes["other"] += int(addrs.size) * elem
            return
        pos = np.searchsorted(self._starts, addrs.astype(np.uint64), side="right") - 1
        for i in np.unique(pos):
            n = int((pos == i).sum())
            s, e, name = self._ranges[i] if i >= 0 else (0, 0, "other")
            inside = addrs[pos == i]
            ok = int(((inside >= s) & (inside < e)).sum()) if i >= 0 else 0
            self.bytes[name] += ok * elem
            self.bytes["other"] += (n - ok) * elem

    def __enter__(self):
        from triton.runtime import interpreter as itp

        counter = self
        builder = itp.InterpreterBuilder
        orig_load, orig_dot = builder.create_masked_load, builder.create_dot
        orig_init = itp.GridExecutor._init_args_hst

        def create_masked_load(self, ptrs, mask, other, *a, **k):
            elem = ptrs.get_element_ty().primitive_bitwidth // 8
            m = np.broadcast_to(mask.data, ptrs.data.shape)
            counter._attribute(ptrs.data[m], elem)
            return orig_load(self, ptrs, mask, other, *a, **k)

        def create_dot(self, a, b, d, *args, **kw):
            sa, sb = a.data.shape, b.data.shape
            batch = int(np.prod(sa[:-2])) if len(sa) > 2 else 1
            counter.flops += 2 * batch * sa[-2] * sa[-1] * sb[-1]
            counter.dots += 1
            if a.data.dtype == b.data.dtype == d.data.dtype == np.float32:
                # Speed only: the interpreter's np.matmul(..., dtype=) takes numpy's slow loop
                # (0.1 s for 64x512x64); BLAS on contiguous copies is ~100x faster.
                c = np.ascontiguousarray(a.data) @ np.ascontiguousarray(b.data)
                return itp.TensorHandle(c + d.data, d.dtype.scalar)
            return orig_dot(self, a, b, d, *args, **kw)

        def init_args(self, args_dev, kwargs):
            import inspect

            args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
            try:
                params = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            except TypeError:
                params = dict(kwargs_hst)
            counter._set_launch_ranges(params)
            counter._patched = set()  # the launch restores its patches at its end: re-patch per launch
            return args_hst, kwargs_hst

        orig_call = itp.InterpretedFunction.__call__

        def device_call(self, *args, **kwargs):
            # Speed only, nothing counted changes: a @triton.jit helper called from a kernel re-patches
            # triton.language on every call (~20 ms each, most of the interpreter's time on these
            # kernels); patching once per launch and module is enough.
            key = id(self.fn.__globals__)
            if key not in counter._patched:
                itp._patch_lang(self.fn)
                counter._patched.add(key)
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise itp.InterpreterError(repr(e)) from e

        self._saved = [(builder, "create_masked_load", orig_load), (builder, "create_dot", orig_dot),
                       (itp.GridExecutor, "_init_args_hst", orig_init),
                       (itp.InterpretedFunction, "__call__", orig_call)]
        builder.create_masked_load = create_masked_load
        builder.create_dot = create_dot
        itp.GridExecutor._init_args_hst = init_args
        itp.InterpretedFunction.__call__ = device_call
        return self

    def __exit__(self, *exc):
        for obj, name, fn in self._saved:
            setattr(obj, name, fn)
        self._saved = []
        return False


# Scaled shapes (see the module docstring), sized for the interpreter (about 0.5 s per tile on a
# shared CPU). dsv32: H=128 (two 64-head blocks), 576/512 latent rows, BLOCK_N 64 tiles, context
# 4096 instead of 32K (a decode reads only the selected rows: context does not change the counts).
# 4 x 1 keeps K=2048, whose 16-way split the plan depends on; 64 x 1 (128 programs: no split on 132
# SMs at any K) uses K=128, every tile full as at 2048. The prefill is 128 causal tokens selecting
# 64 (K / context = 1/2 as at 4096 / 2048).
WORK_PRESETS: Dict[str, List[Case]] = {
    "dsv32-decode": [dsv32("dsv32-decode-64x1", batch=64, q_per_seq=1, context=4096, K=128),
                     dsv32("dsv32-decode-4x1", batch=4, q_per_seq=1, context=4096)],
    "dsv32-prefill": [dsv32("dsv32-prefill", batch=1, q_per_seq=128, context=128, K=64, causal=True,
                            page_size=0)],
    # NSA selected-block branch: 64-token blocks, 4 of them (K * block / context = 1/4 as 16 x 64 / 4096),
    # the last 32 tokens of a 1024-token causal prefill.
    "nsa-prefill": [nsa("nsa-prefill", batch=1, q_per_seq=32, context=1024, K=4)],
    # The backward (--backward): the prefill above with 16 heads instead of 128 (the backward's head
    # block is 16 at 512-wide rows, so any multiple of 16 fills its tiles alike) and 128 causal tokens
    # selecting 64 (K / context = 1/2 as above): the interpreter runs one program per token and head block.
    "dsv32-prefill-backward": [dsv32("dsv32-prefill-bwd", batch=1, q_per_seq=128, context=128, K=64, causal=True,
                                     page_size=0, H=16)],
    # The counter's own test: one token, one tile, numbers computable by hand (tests/test_triton_work.py).
    "tiny": [dsv32("tiny", batch=1, q_per_seq=1, context=32, H=16, Dqk=32, Dv=16, K=16, page_size=0)],
}


# Quantized caches (--kv-quant): the cache stored by attention.quantize_kv in tiles of 128 columns.
KV_QUANT = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
SCALE_BLOCK = 128


def compulsory_bytes(p: Case, kept: int, kv_quant: Optional[str] = None) -> Dict[str, int]:
    """Each (token, kv head)'s kept rows once, q once, out once (bytes of the problem's dtype; a
    quantized kv: 1 byte a column plus its rows' float32 tile scales, kv_scale)."""
    es = torch.tensor([], dtype=p.torch_dtype).element_size()
    out = dict(kv=kept * p.Dqk * es, q=p.T * p.H * p.Dqk * es, out=p.T * p.H * p.Dv * es)
    if kv_quant:
        out.update(kv=kept * p.Dqk, kv_scale=kept * math.ceil(p.Dqk / SCALE_BLOCK) * 4)
    if p.Dr:
        out.update(kv_rope=kept * p.Dr * es, q_rope=p.T * p.H * p.Dr * es)
    if not p.latent:
        out["v"] = kept * p.Dv * es
    return out


def measure(p: Case, target: str, kv_quant: Optional[str] = None) -> Dict[str, object]:
    """Run problem ``p`` through the triton backend planned for ``target``; counts and ratios.
    ``kv_quant`` ("fp8" | "int8"): the latent cache quantized (attention.quantize_kv), kv_scale beside it."""
    import attention
    from attention.backends.triton import launch

    old = os.environ.get(launch.TARGET_ENV)
    os.environ[launch.TARGET_ENV] = target
    try:
        inputs = make_inputs(p, "cpu")
        kw = inputs.kwargs
        if kv_quant:
            if not p.latent:
                raise ValueError(f"--kv-quant counts latent caches; {p.name} has a separate v")
            kw["kv"], kw["kv_scale"] = attention.quantize_kv(kw["kv"], KV_QUANT[kv_quant], SCALE_BLOCK)
            kw["scale_block"] = SCALE_BLOCK
        inp = attention.validate(**kw)
        cfg, source = launch.resolve_config(inp)
        plan = launch.plan(inp, cfg)
        names = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
        t0 = time.time()
        with WorkCounter(names) as wc:
            out, lse = launch.forward(inp, autotune=False)
        secs = time.time() - t0
    finally:
        if old is None:
            os.environ.pop(launch.TARGET_ENV, None)
        else:
            os.environ[launch.TARGET_ENV] = old
    kept = kept_candidates(p, inputs.indices)
    useful = flop_count(p, kept)
    need = compulsory_bytes(p, kept, kv_quant)
    hg = p.H // p.Hkv
    blocks64 = math.ceil(hg / 64)
    ratios = {k: (wc.bytes.get(k, 0) / v if v else float("nan")) for k, v in need.items() if k != "out"}
    # What each 64-head block reads per selected row: the row's stored bytes and its tile scales.
    row_bytes = (wc.bytes.get("kv", 0) + wc.bytes.get("kv_scale", 0)) / kept / blocks64 if kept else float("nan")
    return dict(problem=p.name + (f"+{kv_quant}" if kv_quant else ""), describe=p.describe(), target=target,
                kv_quant=kv_quant, kv_bytes_per_row=row_bytes, config_source=source,
                plan={k: v for k, v in plan.items()}, kept=kept, flops_executed=wc.flops, flops_useful=useful,
                flops_ratio=wc.flops / useful if useful else float("nan"), dots=wc.dots,
                bytes_loaded=dict(wc.bytes), bytes_compulsory=need, bytes_ratio=ratios,
                kv_ratio_per_64_heads=ratios["kv"] / blocks64, head_blocks_of_64=blocks64,
                interpreter_seconds=round(secs, 1), finite=bool(torch.isfinite(out.float()).all()))


def measure_backward(p: Case, target: str, deterministic: bool = False) -> Dict[str, object]:
    """Count the Triton backward (attention/backends/triton/backward.py) of problem ``p``: executed dot
    FLOPs against the useful backward, 2.5x the forward's useful FLOPs (recomputed scores, dP, dV, dq,
    dK); the forward that produces (out, lse) runs outside the counter."""
    import attention
    from attention.backends.triton import backward, launch

    inputs = make_inputs(p, "cpu")
    inp = attention.validate(**inputs.kwargs)
    out, lse = launch.forward(inp, autotune=False)
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(out.shape, generator=g).to(out.dtype)
    grad_lse = torch.randn(lse.shape, generator=g)
    t0 = time.time()
    with WorkCounter({k: v for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)}) as wc:
        grads = backward.backward(inp, out, lse, grad_out, grad_lse, deterministic_mode=deterministic)
    secs = time.time() - t0
    kept = kept_candidates(p, inputs.indices)
    useful = 2.5 * flop_count(p, kept)
    hg = p.H // p.Hkv
    exact = 2.0 * kept * hg * (3 * (p.Dqk + p.Dr) + 2 * p.Dv)  # the five dots without padding
    return dict(problem=p.name, describe=p.describe(), target=target, deterministic=deterministic,
                plan=backward.plan(inp), kept=kept, flops_executed=wc.flops, flops_useful=useful,
                flops_ratio=wc.flops / useful if useful else float("nan"), flops_exact_dots=exact,
                dots=wc.dots, bytes_loaded=dict(wc.bytes), interpreter_seconds=round(secs, 1),
                finite=all(bool(torch.isfinite(x.float()).all()) for x in grads if x is not None))


def check_targets(row: Dict[str, object]) -> List[str]:
    """The forward's work targets at the DeepSeek shapes (docs/triton.md "Counting executed work"):
    FLOPs <= 1.05x useful, kv bytes <= 1.05x per 64-head block, q bytes <= 1.1x. Returns the misses."""
    miss = []
    if row["flops_ratio"] > 1.05:
        miss.append(f"FLOPs {row['flops_ratio']:.3f}x useful > 1.05x")
    if row["kv_ratio_per_64_heads"] > 1.05:
        miss.append(f"kv bytes {row['kv_ratio_per_64_heads']:.3f}x per 64-head block > 1.05x")
    if row["bytes_ratio"].get("q", 0) > 1.1:
        miss.append(f"q bytes {row['bytes_ratio']['q']:.3f}x > 1.1x")
    return miss


def table(rows: List[Dict[str, object]]) -> str:
    lines = ["| problem | plan | executed / useful FLOPs | kv bytes / compulsory (per 64-head block) "
             "| kv bytes per selected row (per 64-head block) | q bytes / compulsory | indices bytes | targets |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pl = r["plan"]
        plan = (f"{pl['kernel']}, BLOCK_H {pl['BLOCK_H']}, BLOCK_N {pl['BLOCK_N']}, BLOCK_DV {pl['BLOCK_DV']}, "
                f"{pl['num_splits']} split(s)")
        miss = r.get("misses")
        tgt = "n/a" if miss is None else ("met" if not miss else "; ".join(miss))
        lines.append(f"| {r['problem']} | {plan} | {r['flops_ratio']:.3f} | {r['bytes_ratio']['kv']:.3f} "
                     f"({r['kv_ratio_per_64_heads']:.3f}) | {r['kv_bytes_per_row']:.1f} | {r['bytes_ratio']['q']:.3f} | "
                     f"{r['bytes_loaded'].get('indices', 0)} | {tgt} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.work", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="NVIDIA H200", help="GPU whose launch plan is counted (default %(default)s)")
    ap.add_argument("--preset", action="append", choices=sorted(WORK_PRESETS),
                    help="repeatable; default: dsv32-decode and dsv32-prefill")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--md", help="write the table (with the shapes and versions) here, e.g. docs/benchmarks/")
    ap.add_argument("--backward", action="store_true",
                    help="count the Triton backward instead (default preset: dsv32-prefill-backward; goal <= 1.2x)")
    ap.add_argument("--kv-quant", choices=sorted(KV_QUANT),
                    help="quantize the (latent) cache with attention.quantize_kv, tiles of 128 columns")
    args = ap.parse_args(argv)
    from attention.backends.triton import launch

    try:  # an unknown target is a usage error, before anything runs
        os.environ[launch.TARGET_ENV] = args.target
        launch.sm_count(torch.device("cpu"))
    except ValueError as e:
        ap.error(str(e))
    finally:
        os.environ.pop(launch.TARGET_ENV, None)
    for flag, path in (("--json", args.json), ("--md", args.md)):
        d = os.path.dirname(os.path.abspath(path)) if path else None
        if d and not os.access(d, os.W_OK):
            ap.error(f"{flag}: cannot write to {d}")
    if args.backward:
        return _main_backward(args)
    rows = []
    for name in args.preset or ["dsv32-decode", "dsv32-prefill"]:
        for p in WORK_PRESETS[name]:
            print(f"counting {p.name}: {p.describe()} ...", file=sys.stderr, flush=True)
            row = measure(p, args.target, args.kv_quant)
            if p.family.startswith("dsv32"):
                row["misses"] = check_targets(row)
            rows.append(row)
            print(f"  done in {row['interpreter_seconds']} s: FLOPs {row['flops_ratio']:.3f}x, kv bytes "
                  f"{row['bytes_ratio']['kv']:.3f}x, q bytes {row['bytes_ratio']['q']:.3f}x", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows))
    return 0


def markdown(rows: List[Dict[str, object]]) -> str:
    """The report of a run: table, shapes, where the numbers come from."""
    import triton

    shapes = "\n".join(f"- `{r['problem']}`: {r['describe']}; kept candidates {r['kept']}" for r in rows)
    target = rows[0]["target"] if rows else ""
    return (f"# Executed work of the Triton kernels, planned for {target}\n\n"
            f"`python -m bench.work --target \"{target}\"` (triton {triton.__version__} interpreter, "
            f"torch {torch.__version__}): executed `tl.dot` FLOPs and loaded bytes counted by instrumenting the "
            "interpreter, against the contract's useful FLOPs and compulsory bytes (bench/work.py). "
            "Scaled shapes, tile ratios kept.\n\n" + table(rows) + "\n\n" + shapes + "\n")


def _main_backward(args) -> int:
    from attention.backends.triton import launch

    os.environ[launch.TARGET_ENV] = args.target
    rows = []
    lines = ["| problem | backward plan | executed / useful FLOPs (useful = 2.5x forward) | goal |", "|---|---|---|---|"]
    for name in args.preset or ["dsv32-prefill-backward"]:
        for p in WORK_PRESETS[name]:
            print(f"counting the backward of {p.name}: {p.describe()} ...", file=sys.stderr, flush=True)
            row = measure_backward(p, args.target)
            rows.append(row)
            print(f"  done in {row['interpreter_seconds']} s", file=sys.stderr, flush=True)
            pl = row["plan"]
            lines.append(f"| {p.name} | BLOCK_H {pl['BLOCK_H']}, BLOCK_N {pl['BLOCK_N']}, BLOCK_DK {pl['BLOCK_DK']}, "
                         f"BLOCK_DT {pl['BLOCK_DT']} | {row['flops_ratio']:.3f} | "
                         f"{'met' if row['flops_ratio'] <= 1.2 else 'missed'} (<= 1.2x) |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
