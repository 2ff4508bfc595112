"""Training-step timing: ``python -m bench --backward [--preset train-small|train-dsv32|train-nsa]
[--backends reference,triton] [--repeats N] [--json PATH]``.

Forward + backward of the op (loss = sum(out * dO) + sum(lse * dlse), gradients of q, kv, v) per
backend that has a backward on the device: the reference on the CPU, and on a GPU the Triton kernel
beside the reference. Checked before timed: each backend's gradients against the reference
backend's analytical backward (itself tested against float64 autograd in tests/test_op.py); the
reference is the yardstick and is not checked against itself. Times are medians over repeats of one
whole step, forward alone beside it, in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List, Optional

import torch

from .presets import dsv32, nsa
from .problems import Case, flop_count, kept_candidates, make_inputs

TRAIN_PRESETS: Dict[str, List[Case]] = {
    # Seconds on 2 CPU cores: a DeepSeek-shaped (576/512 latent, 128 heads, one shared selection) causal
    # chunk and an NSA block-selection chunk, scaled down from the prefills of bench/presets.py.
    "train-small": [dsv32("train-dsv32", batch=1, q_per_seq=128, context=512, K=256, causal=True, page_size=0),
                    nsa("train-nsa", batch=1, q_per_seq=256, context=512, K=4)],
    "train-dsv32": [dsv32("train-dsv32", batch=1, q_per_seq=1024, context=4096, K=2048, causal=True, page_size=0)],
    "train-nsa": [nsa("train-nsa", batch=1, q_per_seq=2048, context=4096, K=16)],
}
DIFF = ("q", "kv", "v", "q_rope", "kv_rope")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _step(kw: Dict[str, object], backend: str, go, gl, backward: bool):
    args = {k: (v.detach().requires_grad_(True) if k in DIFF and isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}
    out, lse = __import__("attention").selective_attention(**args, return_lse=True, backend=backend)
    if not backward:
        return None
    loss = (out.float() * go).sum() + torch.where(torch.isfinite(lse), lse * gl, 0).sum()
    names = [k for k in DIFF if k in args]
    return dict(zip(names, torch.autograd.grad(loss, [args[k] for k in names])))


def _median_ms(fn, dev, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def run(problems: List[Case], backends: List[str], device: str, repeats: int) -> List[Dict[str, object]]:
    dev = torch.device(device)
    rows = []
    for p in problems:
        print(f"{p.name}: {p.describe()}", file=sys.stderr, flush=True)
        inputs = make_inputs(p, device)
        kw = inputs.kwargs
        g = torch.Generator().manual_seed(1)
        go = torch.randn(p.T, p.H, p.Dv, generator=g).to(dev)
        gl = torch.randn(p.T, p.H, generator=g).to(dev)
        kept = kept_candidates(p, inputs.indices)
        fwd_flops = flop_count(p, kept)
        want = None
        for name in backends:
            row = dict(problem=p.name, describe=p.describe(), device=device, backend=name, status="checked")
            rows.append(row)
            try:
                got = _step(kw, name, go, gl, True)
                if want is None:
                    want = got if name == "reference" else _step(kw, "reference", go, gl, True)
                if name != "reference":
                    # Scale-aware: gradients of bf16 inputs, 2K candidates: 3e-2 of the largest magnitude.
                    errs = {k: float((got[k].float() - want[k].float()).abs().max()
                                     / max(1.0, float(want[k].float().abs().max()))) for k in got}
                    row["max_rel_grad_err"] = errs
                    if not all(e <= 3e-2 for e in errs.values()):
                        row["status"] = "FAIL"
                        continue
                row["fwd_ms"] = _median_ms(lambda: _step(kw, name, go, gl, False), dev, repeats)
                row["fwd_bwd_ms"] = _median_ms(lambda: _step(kw, name, go, gl, True), dev, repeats)
                row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
                # useful backward = 2.5x the forward's dots (bench/work.py --backward counts the kernel's)
                row["fwd_bwd_gflops"] = 3.5 * fwd_flops / (row["fwd_bwd_ms"] * 1e-3) / 1e9
            except ValueError as e:  # a backend that declines these inputs says why
                row.update(status="n/a", reason=str(e).splitlines()[0])
            print(f"  {name}: {row['status']} {row.get('fwd_bwd_ms', '')}", file=sys.stderr, flush=True)
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    lines = ["| problem | backend | status | forward ms | forward+backward ms | backward ms | GFLOP/s (fwd+bwd, useful) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
        lines.append(f"| {r['problem']} | {r['backend']} | {r['status']} | {f('fwd_ms')} | {f('fwd_bwd_ms')} | "
                     f"{f('bwd_ms')} | {f('fwd_bwd_gflops', '{:.2f}')} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench --backward", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backward", action="store_true", help="(selects this driver)")
    ap.add_argument("--preset", default="train-small", choices=sorted(TRAIN_PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", help="comma-separated (default: every backend with a backward on the device)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    import attention

    if a.backends:
        names = [s.strip() for s in a.backends.split(",")]
    else:
        names = [b.name for b in attention.registry.backends_for(a.device, "attention_backward")]
        names = sorted(set(names) | {"reference"}, key=lambda n: n != "reference")
    rows = run(TRAIN_PRESETS[a.preset], names, a.device, max(1, a.repeats))
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
