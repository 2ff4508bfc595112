"""Outputs of a benchmark run: the stdout table, JSON, CSV and PNG plots."""

from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from collections import OrderedDict
from typing import Dict, List, Optional

SCHEMA = "attention-bench/1"

# One CSV column per field, in this order (tests check the header against this list).
CSV_FIELDS = [
    "preset", "problem", "family", "context", "shape", "dtype", "device", "impl", "impl_kind", "status",
    "reason", "max_out_err", "max_lse_err", "tol_out", "checked_tokens", "median_ms", "min_ms", "repeats",
    "inner", "timer", "flops", "bytes", "tflops", "gbps", "frac_matmul_peak", "frac_copy_bw",
    "speedup_vs_dense", "dense_impl", "device_name", "torch", "triton", "git_commit", "time_utc",
]


def _fmt(x, spec: str, empty: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return empty
    return format(x, spec)


def _sig(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-" if x is None or math.isnan(x) else "inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _load(la) -> str:
    return "?" if not la else f"{la[0]:.1f}"


def headline(rows: List[Dict]) -> str:
    """One line per problem: the fastest of the package's backends against the baselines."""
    ok = [r for r in rows if r["status"] == "ok" and r["impl_kind"] == "backend"]
    if not ok:
        return "=> no backend of this package passed the check here"
    best = min(ok, key=lambda r: r["median_ms"])
    parts = [f"=> fastest backend: {best['impl']} {best['median_ms']:.3g} ms"]
    for r in rows:
        if r["impl_kind"] != "backend" and r["status"] == "ok":
            x = r["median_ms"] / best["median_ms"]
            parts.append(f"{x:.2f}x faster than {r['impl']}" if x >= 1 else f"{1 / x:.2f}x slower than {r['impl']}")
    if best.get("frac_matmul_peak") is not None:
        parts.append(f"{100 * best['frac_matmul_peak']:.1f}% of the matmul peak")
    return ", ".join(parts)


def table(results: List[Dict], limits: Dict, machine: Dict) -> str:
    lines = []
    lines.append(f"device: {machine.get('device_name')}   torch {machine.get('torch')}   "
                 f"triton {machine.get('triton')}   attention {machine.get('attention')} ({machine.get('git_commit')})")
    lines.append(f"limits measured in this run: matmul {limits['matmul_peak_gflops']:.1f} GFLOP/s "
                 f"({limits['matmul_dtype']} {'x'.join(map(str, limits['matmul_shape']))}), "
                 f"copy {limits['copy_gbps']:.1f} GB/s")
    if "start" in limits:
        lines.append(f"  (better of start {limits['start']['matmul_peak_gflops']:.1f} / end "
                     f"{limits['end']['matmul_peak_gflops']:.1f} GFLOP/s and {limits['start']['copy_gbps']:.1f} / "
                     f"{limits['end']['copy_gbps']:.1f} GB/s; threads {machine.get('torch_threads')}, load average "
                     f"{_load(machine.get('loadavg'))} at start, {_load(machine.get('loadavg_end'))} at end)")
    cols = ["impl", "status", "median ms", "min ms", "TFLOP/s", "GB/s", "% mm peak", "% copy bw",
            "x vs dense", "max err"]
    by_problem: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for r in results:
        by_problem.setdefault(r["problem"], []).append(r)
    for prob, rows in by_problem.items():
        lines.append("")
        lines.append(f"{prob}: {rows[0]['shape']}")
        body = []
        for r in rows:
            ok = r["status"] == "ok"
            body.append([
                r["impl"] + ("" if r["impl_kind"] == "backend" else f" [{r['impl_kind']}]"),
                r["status"] if r["status"] != "n/a" else "n/a",
                _fmt(r.get("median_ms"), ".3f") if ok else "-",
                _fmt(r.get("min_ms"), ".3f") if ok else "-",
                _sig(r.get("tflops"), 3) if ok else "-",
                _sig(r.get("gbps"), 3) if ok else "-",
                _fmt(100 * r["frac_matmul_peak"], ".1f") if ok and r.get("frac_matmul_peak") is not None else "-",
                _fmt(100 * r["frac_copy_bw"], ".1f") if ok and r.get("frac_copy_bw") is not None else "-",
                _fmt(r.get("speedup_vs_dense"), ".2f") if ok else "-",
                _sig(r.get("max_out_err"), 2) if r["status"] in ("ok", "FAIL") else "-",
            ])
        w = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
        lines.append("  " + "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(cols)))
        for b, r in zip(body, rows):
            line = "  " + "  ".join(x.ljust(w[i]) if i < 2 else x.rjust(w[i]) for i, x in enumerate(b))
            if r["status"] != "ok" and r.get("reason"):
                line += f"  ({r['reason']})"
            lines.append(line)
        lines.append("  " + headline(rows))
    lines.append("")
    lines.append("x vs dense = dense-baseline median time / this median time (>1: faster than the dense "
                 "SDPA / dense top-k a user would write); TFLOP/s and GB/s from the model in docs/bench.md "
                 "(useful sparse work, the same count for every row); % of the limits measured above.")
    return "\n".join(lines)


def write_json(path: str, doc: Dict) -> None:
    def clean(o):
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    with open(path, "w") as f:
        json.dump(clean(doc), f, indent=2)
        f.write("\n")


def write_csv(path: str, results: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def write_plots(out_dir: str, prefix: str, results: List[Dict]) -> List[str]:
    """``<prefix>-time.png`` and ``<prefix>-tflops.png``: one panel per problem family, context on x,
    one line per implementation that passed the gate (failing rows have no speed to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for r in results:
        families.setdefault(r["family"], []).append(r)
    written = []
    for metric, label, fname in (("median_ms", "median time per call (ms)", "time"),
                                 ("tflops", "TFLOP/s (useful sparse work, docs/bench.md)", "tflops")):
        n = len(families)
        fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
        for ax, (fam, rows) in zip(axes[0], families.items()):
            impls: "OrderedDict[str, List[Dict]]" = OrderedDict()
            for r in rows:
                impls.setdefault(r["impl"], []).append(r)
            for impl, rs in impls.items():
                pts = sorted((r["context"], r[metric]) for r in rs if r["status"] == "ok" and r.get(metric))
                if not pts:
                    continue
                kind = rs[0]["impl_kind"]
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                        linestyle="-" if kind == "backend" else "--",
                        label=impl + ("" if kind == "backend" else f" ({kind})"))
            ax.set_xscale("log", base=2)
            if metric == "median_ms":
                ax.set_yscale("log")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(label)
            # the family's shape without its context length (that is the x axis)
            shape = ", ".join(x for x in rows[0]["shape"].split(", ") if not x.startswith("L="))
            ax.set_title(f"{fam}\n{textwrap.fill(shape, 70)}", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        dev = results[0].get("device_name", "") if results else ""
        fig.suptitle(f"{prefix}: {dev}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}-{fname}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
