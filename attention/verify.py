"""``python -m attention.verify --device DEV [--backend NAME] [--out DIR]``: the equivalence matrix on
this machine.

Runs every case of ``attention.testing.CASES`` (every feature) in every dtype a backend declares,
for each backend available on the device, against the float64 evaluation of docs/spec.md section 1
computed on the CPU from the same rounded inputs, at docs/spec.md section 4 tolerances, each case twice
(the two runs must agree bit for bit). Prints a pass/fail table with the worst error per cell,
writes ``verify-<device>.json`` and ``verify-<device>.md`` to ``--out``, and exits 0 only when
nothing failed (1: a case failed; 2: nothing could run, or a usage error).

It needs only the installed package (the matrix ships in ``attention.testing``), not the
repository's tests. Environment it sets before any kernel runs:

* ``ATTENTION_NAN_FILL=1``: kernel outputs start as NaN, so an element never written fails.
* ``TRITON_INTERPRET=1`` for ``--device cpu`` when the caller did not set it: Triton kernels run on
  CPU tensors only under the interpreter, and Triton reads the variable when kernels are defined,
  i.e. when ``import attention`` imports the Triton backend. ``python -m attention.verify`` imports
  ``attention`` before this module runs, so when the variable was missing it re-runs itself once in
  a child process with the variable set (set ``TRITON_INTERPRET=0`` to keep Triton off the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

from attention._cli import device_arg, device_unavailable, dir_problem, file_problem, usage_error

_REEXEC_MARK = "ATTENTION_VERIFY_CHILD"


def _tolerances() -> Dict[str, List[float]]:
    """dtype name -> [out, lse] tolerance: attention.testing's table (imported late, see main)."""
    from attention.testing import DTYPE_NAMES, TOLERANCES

    return {DTYPE_NAMES[d]: list(t) for d, t in TOLERANCES.items()}


def _needs_interpreter_reexec(argv: Sequence[str]) -> bool:
    dev = device_arg(argv)
    return dev == "cpu" and "TRITON_INTERPRET" not in os.environ and not os.environ.get(_REEXEC_MARK)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m attention.verify", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", required=True, help="cpu, cuda or npu (cuda:1 etc. accepted)")
    ap.add_argument("--backend", action="append", help="only this backend (repeatable; default: every "
                                                        "backend available on the device)")
    ap.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                    help="only this dtype (repeatable; default: every dtype the backend declares)")
    ap.add_argument("--case", action="append", help="only this case (repeatable; default: all)")
    ap.add_argument("--out", help="directory for verify-<device>.json and verify-<device>.md")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    return ap


def _report_stem(device: str) -> str:
    return f"verify-{device.replace(':', '')}"


def _machine(device: str) -> Dict[str, object]:
    import torch

    import attention

    info: Dict[str, object] = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "attention": attention.__version__,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "ATTENTION_NAN_FILL": os.environ.get("ATTENTION_NAN_FILL", ""),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cell(results: List[Dict]) -> str:
    """Summary of one (case, backend, dtype) cell: ok/FAIL/skip and the worst out error."""
    r = results[0]
    if r["skipped"]:
        return "skip"
    err = r["out_err"]
    e = "inf" if err is None or (isinstance(err, float) and math.isinf(err)) else f"{err:.1e}"
    return ("ok " if r["ok"] else "FAIL ") + e


def render_table(results: List[Dict], columns: List[Tuple[str, str]], cases: List[str]) -> List[List[str]]:
    by = {}
    for r in results:
        by.setdefault((r["case"], r["backend"], r["dtype"]), []).append(r)
    rows = [["case"] + [f"{b}/{d}" for b, d in columns]]
    for c in cases:
        rows.append([c] + [_cell(by[(c, b, d)]) if (c, b, d) in by else "-" for b, d in columns])
    # summary: pass/fail/skip counts and the worst error (also relative to the dtype's tolerance)
    summ = ["worst / tol"]
    counts = ["pass/fail/skip"]
    for b, d in columns:
        rs = [r for r in results if r["backend"] == b and r["dtype"] == d]
        ran = [r for r in rs if not r["skipped"]]
        worst = max((r["out_err"] for r in ran if r["out_err"] is not None), default=float("nan"))
        tol = _tolerances()[d][0]
        summ.append("-" if math.isnan(worst) else f"{worst:.1e} / {tol:g}")
        counts.append(f"{sum(r['ok'] for r in ran)}/{sum(not r['ok'] for r in ran)}/{len(rs) - len(ran)}")
    rows += [counts, summ]
    return rows


VENDOR_CAPTION = ("vendors' rules on out (reported, not part of the verdict): FlashMLA cosine difference "
                  "(its tests: < 1e-5) and CANN check_result pass rate (passes at >= 99.5%); '!' = that "
                  "vendor's test would reject it")


def _vendor_cell(results: List[Dict]) -> str:
    """FlashMLA's cosine difference and CANN's check_result pass rate of one cell; '!' marks a value
    that vendor's test would reject."""
    r = results[0]
    if r["skipped"]:
        return "skip"
    cos, pct = r.get("cos_diff"), r.get("cann_percent")
    if cos is None or pct is None or (isinstance(cos, float) and math.isnan(cos) and math.isnan(pct)):
        return "-"
    from attention.vendor_rules import FLASHMLA_COS_DIFF_LIMIT

    cos_s = "nan" if math.isnan(cos) else f"{cos:.1e}"
    cos_bad = not cos < FLASHMLA_COS_DIFF_LIMIT
    return f"{cos_s}{'!' if cos_bad else ''} {pct:.1f}%{'' if r.get('cann_pass') else '!'}"


def render_vendor_table(results: List[Dict], columns: List[Tuple[str, str]], cases: List[str]) -> List[List[str]]:
    by = {}
    for r in results:
        by.setdefault((r["case"], r["backend"], r["dtype"]), []).append(r)
    rows = [["case"] + [f"{b}/{d}" for b, d in columns]]
    for c in cases:
        rows.append([c] + [_vendor_cell(by[(c, b, d)]) if (c, b, d) in by else "-" for b, d in columns])
    worst = ["worst"]
    for b, d in columns:
        ran = [r for r in results if r["backend"] == b and r["dtype"] == d and not r["skipped"]
               and r.get("cann_percent") is not None and not math.isnan(r["cann_percent"])]
        if not ran:
            worst.append("-")
            continue
        cos = [r["cos_diff"] for r in ran]
        wc = float("nan") if any(math.isnan(x) for x in cos) else max(cos)
        worst.append(f"{'nan' if math.isnan(wc) else format(wc, '.1e')} {min(r['cann_percent'] for r in ran):.1f}%")
    return rows + [worst]


def _text_table(rows: List[List[str]]) -> str:
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(x.ljust(w[i]) for i, x in enumerate(r)) for r in rows)


def _md_table(rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for r in rows[1:]:
        out.append("| " + " | ".join(x.replace("FAIL", "**FAIL**") for x in r) + " |")
    return "\n".join(out)



def _select_cases(names, all_cases):
    """The cases named by --case (all when none), or None after printing the unknown names."""
    if not names:
        return list(all_cases)
    unknown = sorted(set(names) - {c.name for c in all_cases})
    if unknown:
        print(f"verify: unknown case(s) {unknown}; see --list", file=sys.stderr)
        return None
    return [c for c in all_cases if c.name in names]


def _select_backends(names, backends, device):
    """(runnable, not_run) as lists of (backend, reasons); None after printing why nothing can run."""
    kind = device.split(":")[0]
    registered = {b.name: b for b in backends}
    if names:
        unknown = [n for n in names if n not in registered]
        if unknown:
            print(f"verify: unknown backend(s) {unknown}; registered: {sorted(registered)}", file=sys.stderr)
            return None
        chosen = [registered[n] for n in names]
    else:
        chosen = [b for b in registered.values() if b.runs_on(kind)]
    runnable, not_run = [], []
    for b in chosen:
        reasons = list(b.unavailable_reasons())
        if not b.runs_on(kind):
            reasons.append(f"does not run on {kind} (devices: {sorted(b.device_types())})")
        (not_run if reasons else runnable).append((b, reasons))
    for b, reasons in not_run:
        print(f"verify: backend {b.name} not verified on {device}: {'; '.join(reasons)}", file=sys.stderr)
    if not runnable:
        print(f"verify: no backend can run on {device}", file=sys.stderr)
        return None
    return runnable, not_run


def _jobs(runnable, cases, dtype_names, dtypes, names_of):
    """(table columns (backend, dtype name), jobs (backend name, dtype, case)) for every dtype a
    backend declares, filtered by --dtype."""
    dtype_filter = set(dtype_names) if dtype_names else None
    columns: List[Tuple[str, str]] = []
    jobs = []
    for b, _ in runnable:
        for dt in [d for d in dtypes if d in b.dtypes]:  # float32, float16, bfloat16
            name = names_of[dt]
            if dtype_filter and name not in dtype_filter:
                continue
            columns.append((b.name, name))
            jobs += [(b.name, dt, c) for c in cases]
    return columns, jobs


def _run_jobs(jobs, device, names_of, oracle, run_case):
    """Run every job (progress on stderr); returns (result dicts, wall seconds)."""
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), file=sys.stderr, unit="case", dynamic_ncols=True, mininterval=0.3)
    except ImportError:
        bar = None
    expected_cache: Dict[Tuple[str, str], object] = OrderedDict()
    results: List[Dict] = []
    t0 = time.perf_counter()
    for i, (bname, dt, case) in enumerate(jobs):
        desc = f"{bname}/{names_of[dt]}/{case.name}"
        if bar is not None:
            bar.set_description_str(desc[:60])
        else:
            print(f"[{i + 1}/{len(jobs)}] {desc}", file=sys.stderr, flush=True)
        key = (case.name, names_of[dt])
        try:
            if key not in expected_cache:
                # float64 on the CPU from the same rounded inputs, shared by every backend
                expected_cache[key] = oracle(case.make(dt, "cpu"))
            res = run_case(bname, case, dt, device, repeats=2, expected=expected_cache[key]).as_dict()
        except Exception as e:  # a crash in one case is that case's failure, not the run's
            res = dict(backend=bname, case=case.name, dtype=names_of[dt], ok=False, out_err=float("inf"),
                       lse_err=float("inf"), deterministic=False, skipped=False,
                       message=f"raised {type(e).__name__}: {str(e)[:400]}")
        results.append(res)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    return results, wall


def _write_report(out, device, header, verdict, machine, wall, runnable, not_run, results, rows,
                  vendor_rows) -> bool:
    """<out>/<stem>.json and .md; False after printing why they could not be written."""
    failed = [r for r in results if not r["ok"]]
    n_skip = sum(r["skipped"] for r in results)
    stem = _report_stem(device)

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else "inf"
        return x

    doc = dict(schema="attention-verify/1", verdict=verdict, device=device, machine=machine,
               wall_s=round(wall, 1),
               backends=[b.name for b, _ in runnable],
               not_verified={b.name: reasons for b, reasons in not_run},
               tolerances=_tolerances(),
               counts=dict(passed=len(results) - n_skip - len(failed), failed=len(failed), skipped=n_skip),
               results=[{k: clean(v) for k, v in r.items()} for r in results])
    md = [f"# {header}", "", f"Verdict: **{verdict}** ({doc['counts']['passed']} passed, "
          f"{doc['counts']['failed']} failed, {n_skip} skipped) at {machine['time_utc']}.", "",
          "Cells: max |out - float64 reference| per case, backend and dtype; `skip` = the backend's "
          "own not-supported reason.", "", _md_table(rows), "",
          VENDOR_CAPTION[0].upper() + VENDOR_CAPTION[1:] + ".", "", _md_table(vendor_rows), ""]
    if not_run:
        md += ["Not verified:", ""] + [f"- `{b.name}`: {'; '.join(r)}" for b, r in not_run] + [""]
    if failed:
        md += ["Failures:", ""] + [f"- `{r['backend']}/{r['dtype']}/{r['case']}`: {r['message']}" for r in failed]
    skipped = [r for r in results if r["skipped"]]
    if skipped:
        md += ["Skips:", ""] + [f"- `{r['backend']}/{r['dtype']}/{r['case']}`: {r['message']}" for r in skipped]
    try:
        with open(os.path.join(out, stem + ".json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        with open(os.path.join(out, stem + ".md"), "w") as f:
            f.write("\n".join(md) + "\n")
    except OSError as e:  # checked before the run, so only a change since then gets here
        print(f"verify: could not write the report to {out}: {e}; the table above is the result",
              file=sys.stderr)
        return False
    print(f"wrote {stem}.json and {stem}.md to {out}")
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    a = ap.parse_args(argv)
    if a.out and not a.list:
        # Before the matrix runs (minutes on a device), not after: a report that cannot be written
        # is a usage error, exit 2, distinct from a failed case's 1.
        why = dir_problem(a.out) or next(filter(None, (file_problem(os.path.join(a.out, _report_stem(a.device) + ext))
                                                       for ext in (".json", ".md"))), None)
        if why:
            return usage_error(ap, f"--out {a.out}: {why}")
    os.environ.setdefault("ATTENTION_NAN_FILL", "1")

    import torch

    import attention
    from attention.testing import CASES, DTYPE_NAMES, DTYPES, oracle, run_case

    if a.list:
        for c in CASES:
            print(c.name)
        return 0
    device = a.device
    why = device_unavailable(device)
    if why:
        print(f"verify: device {device} is not usable here: {why}", file=sys.stderr)
        return 2

    cases = _select_cases(a.case, CASES)
    picked = _select_backends(a.backend, attention.backends(), device) if cases is not None else None
    if picked is None:
        return 2
    runnable, not_run = picked
    columns, jobs = _jobs(runnable, cases, a.dtype, DTYPES, DTYPE_NAMES)
    if not jobs:
        print("verify: nothing to run (dtype filter excludes every declared dtype)", file=sys.stderr)
        return 2

    results, wall = _run_jobs(jobs, device, DTYPE_NAMES, oracle, run_case)
    failed = [r for r in results if not r["ok"]]
    rows = render_table(results, columns, [c.name for c in cases])
    machine = _machine(device)
    header = (f"attention.verify on {device}"
              f"{' (' + str(machine.get('device_name')) + ')' if machine.get('device_name') else ''}: "
              f"torch {machine['torch']}, triton {machine['triton']}, TRITON_INTERPRET={machine['TRITON_INTERPRET'] or 'unset'}")
    print(header)
    tols = ", ".join(f"{d} {t[0]:g}" for d, t in _tolerances().items())
    print(f"cells: max |out - float64 reference| (docs/spec.md tolerances: {tols})")
    print(_text_table(rows))
    vendor_rows = render_vendor_table(results, columns, [c.name for c in cases])
    print(VENDOR_CAPTION)
    print(_text_table(vendor_rows))
    for b, reasons in not_run:
        print(f"not verified: {b.name}: {'; '.join(reasons)}")
    for r in failed:
        print(f"FAIL {r['backend']}/{r['dtype']}/{r['case']}: {r['message']}")
    n_skip = sum(r["skipped"] for r in results)
    verdict = "PASS" if not failed else "FAIL"
    print(f"{verdict}: {len(results) - n_skip - len(failed)} passed, {len(failed)} failed, {n_skip} skipped "
          f"(backend's own reasons) in {wall:.1f} s")

    if a.out and not _write_report(a.out, device, header, verdict, machine, wall, runnable, not_run, results,
                                   rows, vendor_rows):
        return 2
    return 0 if not failed else 1


def _entry() -> int:
    argv = sys.argv[1:]
    if _needs_interpreter_reexec(argv):
        # attention (and with it triton) is already imported: re-run with the interpreter on.
        env = dict(os.environ, TRITON_INTERPRET="1", ATTENTION_NAN_FILL=os.environ.get("ATTENTION_NAN_FILL", "1"))
        env[_REEXEC_MARK] = "1"
        return subprocess.call([sys.executable, "-m", "attention.verify", *argv], env=env)
    return main(argv)


if __name__ == "__main__":
    sys.exit(_entry())
