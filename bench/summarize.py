"""``python -m bench.summarize OUT/*.json``: Markdown tables of benchmark JSON files (for docs/benchmarks).

Absolute times differ between machines and, on a shared machine, between minutes; the tables lead
with what a run measures against itself: the speed-up over the dense baselines and the fraction of
the matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional


def _f(x, spec: str) -> str:
    return "-" if x is None or isinstance(x, str) else format(x, spec)


def _speedup(rows: List[Dict], r: Dict, dense: str, stat: str = "median_ms") -> Optional[float]:
    d = next((x for x in rows if x["impl"] == dense and x["status"] == "ok"), None)
    if d is None or r["status"] != "ok":
        return None
    return d[stat] / r[stat]


def _ratio(rows, r, dense) -> str:
    a, b = _speedup(rows, r, dense), _speedup(rows, r, dense, "min_ms")
    return "-" if a is None else f"{a:.2f} ({b:.2f})"


def summarize(doc: Dict, show_unavailable: bool = False) -> str:
    m, lim = doc["machine"], doc["limits"]
    out = [f"### Preset `{doc['preset']}`", ""]
    load = m.get("loadavg")
    load_end = m.get("loadavg_end")
    out.append(f"Measured {m.get('time_utc')} on {m.get('device_name')}, torch {m.get('torch')}, "
               f"triton {m.get('triton')}, attention {m.get('attention')} ({m.get('git_commit')}), "
               f"python {m.get('python')}; {m.get('torch_threads')} torch thread(s); load average "
               f"{load[0]:.1f} at start, {load_end[0]:.1f} at end; run took {m.get('wall_s')} s."
               if load and load_end else f"Measured {m.get('time_utc')} on {m.get('device_name')}.")
    out.append("")
    out.append(f"Limits measured in the same run (better of start and end): matmul "
               f"{lim['matmul_peak_gflops']:.1f} GFLOP/s ({lim['matmul_dtype']}), copy {lim['copy_gbps']:.1f} GB/s. "
               f"Timing: {doc['timing']['repeats']} interleaved samples after the check call and "
               f"{doc['timing']['warmup']} warm-up call(s); median (min) per call; ratios from medians, and from minimums in brackets.")
    out.append("")
    out.append("| problem | implementation | status | x vs sdpa-dense, median (min) | x vs dense-matmul, median (min) "
               "| % of matmul peak | GFLOP/s | median ms (min) | max err |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    by: Dict[str, List[Dict]] = {}
    for r in doc["results"]:
        by.setdefault(r["problem"], []).append(r)
    for prob, rows in by.items():
        for r in rows:
            if r["status"] == "n/a" and not show_unavailable:
                continue
            ok = r["status"] == "ok"
            name = r["impl"] + ("" if r["impl_kind"] == "backend" else f" ({r['impl_kind']})")
            err = r.get("max_out_err")
            out.append(
                f"| {prob} | {name} | {r['status']} | {_ratio(rows, r, 'sdpa-dense')} "
                f"| {_ratio(rows, r, 'dense-matmul')} "
                f"| {_f(100 * r['frac_matmul_peak'] if ok else None, '.1f')} "
                f"| {_f(r['tflops'] * 1e3 if ok else None, '.2f')} "
                f"| {_f(r['median_ms'] if ok else None, '.2f')} ({_f(r['min_ms'] if ok else None, '.2f')}) "
                f"| {_f(err, '.1e')} |")
    na = sorted({(r["impl"], r["reason"]) for r in doc["results"] if r["status"] == "n/a"})
    if na and not show_unavailable:
        out.append("")
        out.append("Not run here: " + "; ".join(f"`{i}` ({why})" for i, why in na) + ".")
    out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.summarize", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--all", action="store_true", help="also list implementations that could not run")
    a = ap.parse_args(argv)
    for path in a.json:
        with open(path) as f:
            print(summarize(json.load(f), a.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
