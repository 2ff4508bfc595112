"""CPU memory target of select (docs/selection.md): fused select over 2048 queries x 65536 keys (8 indexer heads of width 64)
within 256 MB of extra peak memory, where the [T, W] float32 score matrix alone is 512 MB.

Each measurement runs in a fresh process (docs/traps.md): the inputs are built, the peak is reset by
writing 5 to /proc/self/clear_refs, the call runs, and extra peak = VmHWM - VmRSS before the call.
Correctness first (docs/style.md rule 9): on a slice of the queries the fused result must equal
``topk_indices(lightning_indexer(...))``.

    PYTHONPATH=. python bench/selection_memory.py [--T 2048 --W 65536 --k 2048] [--unfused]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(mode: str, T: int, W: int, k: int, Hi: int, Di: int) -> dict:
    import torch

    import attention

    torch.manual_seed(0)
    q = torch.randn(T, Hi, Di)
    kx = torch.randn(W, Di)
    w = torch.randn(T, Hi)
    # warm the code paths (and the allocator's caches) on a tiny problem first
    attention.select(q[:2], kx[:64], w[:2], 8)
    attention.topk_indices(attention.lightning_indexer(q[:2], kx[:64], w[:2]), 8)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "fused":
        idx = attention.select(q, kx, w, k)
    else:
        idx = attention.topk_indices(attention.lightning_indexer(q, kx, w), k)
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    # correctness: last 16 queries (they see the most keys under causal masking) against the unfused path
    ref = attention.topk_indices(attention.lightning_indexer(q, kx, w)[-16:], k) if mode == "fused" else None
    ok = True if ref is None else bool(torch.equal(idx[-16:], ref))
    return dict(mode=mode, T=T, W=W, k=k, Hi=Hi, Di=Di, seconds=round(dt, 2), extra_peak_mb=round((peak - rss0) / 2**20, 1),
                score_matrix_mb=round(T * W * 4 / 2**20, 1), correct=ok, threads=torch.get_num_threads())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--W", type=int, default=65536)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--Hi", type=int, default=8)
    ap.add_argument("--Di", type=int, default=64)
    ap.add_argument("--unfused", action="store_true", help="also measure lightning_indexer + topk_indices")
    ap.add_argument("--target-mb", type=float, default=256.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.T, a.W, a.k, a.Hi, a.Di)))
        return 0
    rows = []
    for mode in ["fused"] + (["unfused"] if a.unfused else []):
        print(f"[{mode}] T={a.T} W={a.W} k={a.k} Hi={a.Hi} Di={a.Di} (fresh process)...", flush=True)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--T", str(a.T), "--W", str(a.W),
                            "--k", str(a.k), "--Hi", str(a.Hi), "--Di", str(a.Di)], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))))
        if r.returncode:
            print(r.stderr)
            return r.returncode
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"\n{'mode':8} {'seconds':>8} {'extra peak MB':>14} {'score matrix MB':>16} {'correct':>8} {'target':>10}")
    ok = True
    for r in rows:
        hit = r["extra_peak_mb"] <= a.target_mb if r["mode"] == "fused" else None
        ok &= r["correct"] and (hit is not False)
        print(f"{r['mode']:8} {r['seconds']:8.2f} {r['extra_peak_mb']:14.1f} {r['score_matrix_mb']:16.1f} "
              f"{str(r['correct']):>8} {('-' if hit is None else ('<= %d ok' % a.target_mb if hit else 'MISSED')):>10}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
