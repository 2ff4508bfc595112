"""``python -m attention.tune``: measure the Triton forward's configs on this device, save the best.

    python -m attention.tune                         # cuda if present, the DeepSeek presets
    python -m attention.tune --device cpu            # interpreter (TRITON_INTERPRET=1), tiny preset
    python -m attention.tune --preset deepseek-decode --full

For each preset: build the inputs on the device, check the store's current config against the
reference (correctness before timing), time every config of the search space (each one's output is
compared with the first's), and merge the fastest into the user store
(``attention.tuning.store_path()``) under the preset's shape bucket. Shows a progress bar and ends
with a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Dict, List, Optional

from ._cli import device_arg, dir_problem, file_problem, positive_int

# The interpreter is chosen when triton is imported: decide before importing anything that does
# (either spelling of the flag: --device cpu and --device=cpu).
if __name__ == "__main__" and device_arg(sys.argv[1:]) == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


from .testing import Case, Problem  # noqa: E402  (the one problem description, shared with bench/ and the tests)

# Tuning presets, keyed by ``family`` (the --preset name).
PRESETS: Dict[str, Case] = {p.family: p for p in [
    Problem("deepseek-prefill", batch=1, q_per_seq=4096, context=4096, H=128, Hkv=1, Dqk=576, Dv=512, K=2048,
            page_size=0, causal=True,
            description="DeepSeek-V3.2 sparse prefill: T=4096, MQA latent 576/512, top-2048, causal"),
    Problem("deepseek-decode", batch=64, q_per_seq=1, context=32768, H=128, Hkv=1, Dqk=576, Dv=512, K=2048,
            page_size=64, causal=True,
            description="DeepSeek-V3.2 sparse decode: 64 x 1 token, 32K paged latent cache, top-2048"),
    Problem("deepseek-decode-8k", batch=32, q_per_seq=1, context=8192, H=128, Hkv=1, Dqk=576, Dv=512, K=2048,
            page_size=64, causal=True, description="decode at 8K context"),
    # The same decode over quantized caches: FlashMLA's V3.2 record as the op's views, 512
    # latent values in fp8 / int8 with a float32 scale per 128, the 64 rope values apart in bfloat16.
    *[Problem(f"deepseek-decode-{qt}", batch=64, q_per_seq=1, context=32768, H=128, Hkv=1, Dqk=512, Dr=64,
              Dv=512, K=2048, page_size=64, causal=True, kv_quant=qt,
              description=f"DeepSeek-V3.2 sparse decode over a {qt} latent cache (512 {qt} + 64 bf16 rope)")
      for qt in ("fp8", "int8")],
    Problem("tiny", batch=2, q_per_seq=2, context=96, H=16, Hkv=1, Dqk=64, Dv=32, K=48, page_size=16,
            causal=True, dtype="float32", description="interpreter-sized (CPU, TRITON_INTERPRET=1)"),
]}
GPU_PRESETS = ("deepseek-prefill", "deepseek-decode")
#: what bench/gpu_triton_check.py times on a GPU: the tuned presets, then the quantized decodes (untuned)
GPU_BENCH_PRESETS = GPU_PRESETS + ("deepseek-decode-fp8", "deepseek-decode-int8")
CPU_PRESETS = ("tiny",)


def make_inputs(preset: Case, device: str, seed: int = 0, dtype: Optional[torch.dtype] = None) -> Dict:
    """Keyword arguments of ``attention.selective_attention`` for a preset, built on ``device``.

    Indices are distinct random positions the query may see (causal: <= its position), -1 padded,
    so the FLOP count is the count of kept candidates.
    """
    return preset.make(dtype, device, seed)


def flops(args: Dict) -> float:
    """Useful FLOPs: 2 x heads x kept candidates x (Dqk + Dv) (host read: outside any timing)."""
    q, idx = args["q"], args["indices"]
    H, Hkv = q.shape[1], args["kv"].shape[-2]
    Dqk = q.shape[2] + (args["q_rope"].shape[-1] if args.get("q_rope") is not None else 0)
    # a shared index row ([T, 1, K]) serves every kv head
    kept = int((idx >= 0).sum().item()) * (Hkv // idx.shape[1]) * (H // Hkv)
    return 2.0 * kept * (Dqk + args.get("d_v", Dqk))


def search_space(inp, full: bool = False) -> List[Dict]:
    """Configs to measure. The quick space (default) is sized for bench/gpu_check.sh's time budget:
    each distinct set of block sizes is a separate Triton compile of a 576-wide kernel."""
    heads_per_kv = inp.heads_per_kv
    decode = inp.num_tokens * inp.num_kv_heads <= 128
    if inp.device.type == "cpu":
        grid = dict(BLOCK_N=[16, 32], BLOCK_D=[64, 128], BLOCK_H=[16], BLOCK_DV=[512], num_warps=[1],
                    num_stages=[1], num_splits=[0, 2])
        space = _product(grid)
    elif full:
        grid = dict(BLOCK_N=[16, 32, 64], BLOCK_D=[32, 64, 128], BLOCK_H=[32, 64, 128], BLOCK_DV=[128, 256, 512],
                    num_warps=[4, 8], num_stages=[1, 2, 3], num_splits=[0, 2, 4, 8, 16] if decode else [0])
        # An fp32 accumulator of BLOCK_H x BLOCK_DV above 64 x 512 cannot stay in registers.
        space = [c for c in _product(grid) if c["BLOCK_H"] * c["BLOCK_DV"] <= 64 * 512]
    else:
        # (BLOCK_H, BLOCK_DV): value blocks recompute the scores, head blocks re-gather the keys, and
        # wgmma wants M >= 64; which costs least is what this measures.
        tiles = [(64, 256), (64, 512), (128, 256), (32, 512)]
        space = []
        for bh, bdv in tiles:
            for bn in ([32] if decode else [32, 64]):
                for splits in ([0, 4, 16] if decode else [0]):
                    space.append(dict(BLOCK_N=bn, BLOCK_D=64, BLOCK_H=bh, BLOCK_DV=bdv, num_warps=8, num_stages=2,
                                      num_splits=splits))
    if heads_per_kv < 64:  # small groups: head blocks no larger than the group (min 16 for tl.dot)
        cap = max(16, 1 << (heads_per_kv - 1).bit_length())
        seen, uniq = set(), []
        for c in space:
            c = dict(c, BLOCK_H=min(c["BLOCK_H"], cap))
            key = tuple(sorted(c.items()))
            if key not in seen:
                seen.add(key)
                uniq.append(c)
        space = uniq
    if inp.device.type == "cuda":
        from .backends.triton import launch

        limit = launch._max_shared_mem(inp.device.index or 0)
        elem = inp.q.element_size()
        space = [c for c in space if launch.smem_estimate(c, c["BLOCK_H"], c["BLOCK_DV"], elem) <= limit] or space[:1]
    return space


def _product(grid: Dict[str, list]) -> List[Dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def _time(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn``."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(20, repeats * 5), return_mode="median") * 1e-3
    fn()
    ts = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=True)
    except ImportError:  # pragma: no cover
        class _P:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                print(file=sys.stderr)
        return _P()


def tune_preset(preset: Case, device: str, full: bool = False, repeats: int = 3, save: bool = True,
                check: bool = True) -> Dict:
    import attention
    from attention.testing import TOLERANCES

    from .backends.triton import launch

    args = make_inputs(preset, device)
    inp = attention.validate(**args)
    bucket = launch.shape_bucket(inp)
    base_cfg, base_src = launch.resolve_config(inp)
    tol = TOLERANCES[inp.dtype][0]
    base_out, _ = launch.forward(inp, autotune=False)
    if check:  # correctness before timing: the current config against the reference backend
        ref_out, _ = attention.get_backend("reference").forward(inp)
        err = float((base_out.float() - ref_out.float()).abs().max())
        if not err <= tol:
            raise RuntimeError(f"{preset.family}: triton differs from the reference by {err:.3g} > {tol}")
    fl = flops(args)
    base_t = _time(lambda: launch.forward(inp, autotune=False), device, repeats)
    results = []
    space = search_space(inp, full)
    bar = _progress(len(space), preset.family)
    for cfg in space:
        try:
            out, _ = launch.forward(inp, override=cfg, autotune=False)
            err = float((out.float() - base_out.float()).abs().max())
            if not err <= 2 * tol:
                raise RuntimeError(f"output differs by {err:.3g}")
            t = _time(lambda: launch.forward(inp, override=cfg, autotune=False), device, repeats)
            results.append((t, cfg, ""))
            bar.set_postfix_str(f"best {min(r[0] for r in results) * 1e6:.0f} us")
        except Exception as e:  # a config that does not compile or fit: recorded, not fatal
            results.append((float("inf"), cfg, f"{type(e).__name__}: {str(e)[:80]}"))
        bar.update(1)
    bar.close()
    ok = [r for r in results if r[0] < float("inf")]
    if not ok:
        raise RuntimeError(f"{preset.family}: no config ran: {results[0][2]}")
    best_t, best_cfg, _ = min(ok, key=lambda r: r[0])
    entry = dict(config=best_cfg, measured=True, us=round(best_t * 1e6, 2), tflops=round(fl / best_t / 1e12, 3),
                 preset=preset.family, configs_tried=len(results), torch=torch.__version__,
                 triton=__import__("triton").__version__,
                 when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    row = dict(preset=preset.family, bucket=bucket, tried=len(results), failed=len(results) - len(ok),
               best=best_cfg, us=best_t * 1e6, tflops=fl / best_t / 1e12, base_us=base_t * 1e6, base_source=base_src,
               speedup=base_t / best_t, device=launch.device_name(inp.device), entry=entry, path=None)
    if save:
        save_row(row)
    return row


def save_row(row: Dict) -> str:
    """Merge one ``tune_preset`` result into the user store; returns (and records in ``row``) the path."""
    from . import tuning
    from .backends.triton import launch

    path = tuning.save_entries(launch.BACKEND_NAME, row["device"], launch.KERNEL_VERSION, {row["bucket"]: row["entry"]})
    row["path"] = str(path)
    return row["path"]


def store_problem(device_name: str) -> Optional[str]:
    """Why the store file of ``device_name`` cannot be written (checked before measuring), or None."""
    from . import tuning

    path = tuning.store_path(device_name)
    why = dir_problem(path.parent)
    if why is None and path.is_dir():
        why = f"{path} is a directory"
    return None if why is None else f"tuning store {path}: {why} (set ATTENTION_TUNING_DIR, or pass --no-save)"


def format_table(rows: List[Dict]) -> str:
    head = ["preset", "configs", "failed", "before (us)", "best (us)", "TFLOP/s", "speedup", "best config"]
    lines = [head]
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["best"].items())
        lines.append([r["preset"], str(r["tried"]), str(r["failed"]), f"{r['base_us']:.1f}", f"{r['us']:.1f}",
                      f"{r['tflops']:.2f}", f"{r['speedup']:.2f}x", cfg])
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = [" | ".join(c.ljust(w[i]) for i, c in enumerate(x)) for x in lines]
    out.insert(1, "-+-".join("-" * n for n in w))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attention.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="cuda (default when present) or cpu (Triton interpreter; tiny preset)")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable; default by device")
    ap.add_argument("--full", action="store_true", help="the wide search space (slow: hundreds of compiles)")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--no-save", action="store_true", help="measure and print only")
    ap.add_argument("--json", help="also write the results table as JSON here")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU visible")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu needs TRITON_INTERPRET=1 set before triton is imported")
    presets = a.preset or list(GPU_PRESETS if device == "cuda" else CPU_PRESETS)
    from . import tuning
    from .backends.triton import launch

    name = launch.device_name(torch.device(device))
    # Every output is checked before the first measurement (minutes on a GPU), not after it.
    if not a.no_save:
        why = store_problem(name)
        if why:
            ap.error(why)
    if a.json:
        why = file_problem(a.json)
        if why:
            ap.error(f"--json {a.json}: {why}")
    print(f"tuning triton {launch.KERNEL_VERSION} on {name} "
          f"-> {'(not saved)' if a.no_save else tuning.store_path(name)}", file=sys.stderr)
    rows, errors = [], []
    for p in presets:
        try:
            rows.append(tune_preset(PRESETS[p], device, full=a.full, repeats=a.repeats, save=False))
        except RuntimeError as e:  # one preset that cannot run must not lose the others' measurements
            errors.append(f"{p}: {e}")
    # Measurements are printed before anything is written: a write that fails after all cannot lose them.
    if rows:
        print(format_table(rows))
    for e in errors:
        print(f"tune: {e}", file=sys.stderr)
    status = 1 if errors else 0
    if not a.no_save:
        for r in rows:
            try:
                save_row(r)
            except OSError as e:
                print(f"tune: could not save {r['preset']} ({e}); its entry, to merge by hand:\n"
                      f"{json.dumps({r['bucket']: r['entry']}, default=str)}", file=sys.stderr)
                status = 2
    if a.json:
        try:
            with open(a.json, "w") as fh:
                json.dump(rows, fh, indent=1, default=str)
        except OSError as e:
            print(f"tune: could not write --json {a.json}: {e} (the table above holds the results)", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
