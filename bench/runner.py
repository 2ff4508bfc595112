"""``python -m bench``: check, then time, every implementation on the same inputs, in one run.

For each problem of the preset: build the inputs once; compute the expected output in float64 on the
CPU from those same (rounded) inputs; then for each implementation (the package's registered
backends that can run here, the dense SDPA baseline, peers when importable) run it once with
outputs pre-filled with NaN and compare with the expected values at docs/spec.md tolerances. Only an
implementation that passes is timed; one that fails is reported as FAIL with its error and never
with a speed. The device's own limits (matmul peak, copy bandwidth) are measured in the same run,
so every figure is also a ratio that means something on a loaded or different machine.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from attention.testing import max_error as _max_err

from attention._cli import (device_type, device_unavailable, dir_problem, file_problem, nonnegative_float,
                            nonnegative_int, positive_int)

from . import report
from .baselines import BackendImpl, Impl, Unavailable, all_baselines, sdpa_mode, split_result
from .presets import DEFAULT_PRESET, PRESET_TIMING, PRESETS
from .problems import DTYPES, Case, byte_count, check_tokens, expected_float64, flop_count, make_inputs
from .selection import (check_selection, expected_selection, make_selection_inputs, selection_bytes,
                        selection_flops, selection_impls)
from .timing import Timing, machine_info, measure_limits, nan_fill, sample_ms, timer_name, warm_and_calibrate

DENSE_NAMES = ("sdpa-dense", "dense-scores+torch.topk")


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "npu"
    return "cpu"


def _is_selection(p: Case) -> bool:
    """An indexer + top-k problem (bench/selection.py) rather than an attention one."""
    return p.op != "attention"


def backend_impls(device: str, names: Optional[Sequence[str]]) -> List[Impl]:
    """The registered backends that run on ``device`` (all of them, or those named)."""
    import attention

    out = []
    for b in attention.backends():
        if names is not None and b.name not in names:
            continue
        if not b.runs_on(device):
            continue
        out.append(BackendImpl(b.name))
    return out


def _check_attention(res, inp, expected, tokens, impl: Impl) -> Dict:
    from attention.testing import TOLERANCES

    p = inp.problem
    tol_out, tol_lse = TOLERANCES[p.torch_dtype]
    out, lse = split_result(res)
    exp_out, exp_lse = expected
    msgs = []
    if tuple(out.shape) != (p.T, p.H, p.Dv):
        msgs.append(f"out shape {tuple(out.shape)}, expected {(p.T, p.H, p.Dv)}")
        out_err = float("inf")
    else:
        out_err = _max_err(out[tokens], exp_out)
    lse_err = None
    # lse is part of the contract for the package's backends; peers' lse conventions differ.
    if impl.kind == "backend" and lse is not None:
        lse_err = _max_err(lse[tokens], exp_lse) if tuple(lse.shape) == (p.T, p.H) else float("inf")
        if not lse_err <= tol_lse:
            msgs.append(f"max |lse - ref| = {lse_err:.3g} > {tol_lse}")
    if not out_err <= tol_out:
        msgs.append(f"max |out - ref| = {out_err:.3g} > {tol_out}")
    return dict(ok=not msgs, max_out_err=out_err, max_lse_err=lse_err, tol_out=tol_out,
                checked_tokens=len(tokens), reason="; ".join(msgs))


def _row_base(preset, prob, shape, dtype, device, impl, machine) -> Dict:
    return dict(preset=preset, problem=prob.name, family=prob.family, context=prob.context, shape=shape,
                dtype=dtype, device=device, impl=impl.name, impl_kind=impl.kind, status="n/a", reason="",
                max_out_err=None, max_lse_err=None, tol_out=None, checked_tokens=None, median_ms=None,
                min_ms=None, samples_ms=None, repeats=None, inner=None, timer=None, flops=None, bytes=None,
                tflops=None, gbps=None, frac_matmul_peak=None, frac_copy_bw=None, speedup_vs_dense=None,
                dense_impl=None, device_name=machine.get("device_name"), torch=machine.get("torch"),
                triton=machine.get("triton"), git_commit=machine.get("git_commit"),
                time_utc=machine.get("time_utc"))


class _Progress:
    """tqdm on stderr when installed, else one line per step."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True, mininterval=0.3)
        except ImportError:
            self.bar = None
        self.total, self.n = total, 0

    def step(self, desc: str):
        self.n += 1
        if self.bar is not None:
            self.bar.set_description_str(desc[:60])
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def describe(self, desc: str):
        if self.bar is not None:
            self.bar.set_description_str(desc[:60])

    def close(self):
        if self.bar is not None:
            self.bar.close()


def check_impl(impl: Impl, prepare_arg, check, device: torch.device, row: Dict):
    """Prepare and check once; returns the callable to time when the check passed, else None.
    Fills ``row`` (status, errors, reason) in place."""
    try:
        fn = impl.prepare(prepare_arg)
    except Unavailable as e:
        row.update(status="n/a", reason=str(e))
        return None
    except Exception as e:
        row.update(status="error", reason=f"prepare: {type(e).__name__}: {str(e)[:300]}")
        return None
    res = None
    try:
        with nan_fill(True):
            res = fn()
            if device.type != "cpu":
                from .timing import synchronize

                synchronize(device)
        verdict = check(res)
    except Exception as e:
        row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        return None
    finally:
        del res
    row.update({k: verdict[k] for k in ("max_out_err", "max_lse_err", "tol_out", "checked_tokens")})
    if not verdict["ok"]:
        row.update(status="FAIL", reason=verdict["reason"])
        return None
    return fn


def time_interleaved(timed: List, device: torch.device, warmup: int, repeats: int, min_sample_s: float,
                     progress: Optional["_Progress"] = None, label: str = "") -> None:
    """Warm up and calibrate each passing implementation, then take the samples in rounds
    (impl 1, impl 2, ..., impl 1, impl 2, ...). Fills each row in place."""
    state = []
    for fn, row in timed:
        try:
            inner = warm_and_calibrate(fn, device, warmup, min_sample_s)
            state.append([fn, row, inner, []])
        except Exception as e:
            row.update(status="error", reason=f"while timing: {type(e).__name__}: {str(e)[:300]}")
    for r in range(repeats):
        if progress is not None:
            progress.describe(f"{label}: timing round {r + 1}/{repeats}")
        for st in state:
            fn, row, inner, samples = st
            if row["status"] == "error":
                continue
            try:
                samples.append(sample_ms(fn, device, inner))
            except Exception as e:
                row.update(status="error", reason=f"while timing: {type(e).__name__}: {str(e)[:300]}")
    for fn, row, inner, samples in state:
        if row["status"] == "error":
            continue
        if not samples:
            row.update(status="error", reason="no timing samples (--repeats 0?)")
            continue
        t = Timing(samples, inner, timer_name(device))
        row.update(status="ok", median_ms=t.median_ms, min_ms=t.min_ms, samples_ms=t.samples_ms,
                   repeats=len(samples), inner=inner, timer=t.timer)


def _derive(rows: List[Dict], flops: float, nbytes: float, limits: Dict) -> None:
    dense = next((r for r in rows if r["impl"] in DENSE_NAMES and r["status"] == "ok"), None)
    for r in rows:
        r["flops"], r["bytes"] = flops, nbytes
        if r["status"] != "ok":
            continue
        s = r["median_ms"] * 1e-3
        r["tflops"] = flops / s / 1e12
        r["gbps"] = nbytes / s / 1e9
        r["frac_matmul_peak"] = flops / s / (limits["matmul_peak_gflops"] * 1e9)
        r["frac_copy_bw"] = nbytes / s / (limits["copy_gbps"] * 1e9)
        if dense is not None:
            r["speedup_vs_dense"] = dense["median_ms"] / r["median_ms"]
            r["dense_impl"] = dense["impl"]


def run(problems: List[Case], *, preset: str, device: str, backend_names: Optional[Sequence[str]],
        warmup: int, repeats: int, min_sample_s: float, include_baselines: bool = True,
        quick_limits: bool = False, seed: int = 0, command: Optional[str] = None) -> Dict:
    dev = torch.device(device)
    machine = machine_info(dev)
    dtype0 = next((p.torch_dtype for p in problems), torch.bfloat16)
    limits = measure_limits(dev, dtype0, quick=quick_limits)
    plan = [(prob, _impls(prob, device, backend_names, include_baselines)) for prob in problems]
    progress = _Progress(sum(len(i) for _, i in plan))
    results: List[Dict] = []
    t_start = time.perf_counter()
    try:
        for prob, impls in plan:
            results.extend(_problem_rows(prob, impls, preset, device, machine, seed, warmup, repeats, min_sample_s,
                                         progress))
            gc.collect()
    finally:
        progress.close()
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    limits = _limits_at_both_ends(limits, measure_limits(dev, dtype0, quick=quick_limits))
    by_problem: Dict[str, List[Dict]] = {}
    for r in results:
        by_problem.setdefault(r["problem"], []).append(r)
    for rows in by_problem.values():
        _derive(rows, rows[0]["flops"], rows[0]["bytes"], limits)
    machine["wall_s"] = round(time.perf_counter() - t_start, 1)
    return dict(
        schema=report.SCHEMA, preset=preset, command=command or "(called from Python)",
        machine=machine, limits=limits,
        timing=dict(warmup=warmup, repeats=repeats, min_sample_s=min_sample_s,
                    timer="cuda_events" if dev.type == "cuda" else "perf_counter",
                    statistic="median and min over repeats of the mean of `inner` back-to-back calls"),
        model=_model(problems, dev),
        results=results,
    )


def _impls(prob: Case, device: str, backend_names: Optional[Sequence[str]], include_baselines: bool) -> List[Impl]:
    """What is checked and timed on ``prob``."""
    if _is_selection(prob):
        return [i for i in selection_impls() if include_baselines or i.kind == "backend"]
    impls = backend_impls(device, backend_names)
    # The baselines read a float cache: for a quantized one they would time a float attention
    # over the dequantized values, not a quantized decode (the bfloat16 row has them).
    if include_baselines and not prob.kv_quant:
        impls += all_baselines()
    return impls


def _problem_rows(prob: Case, impls: List[Impl], preset: str, device: str, machine: Dict, seed: int,
                  warmup: int, repeats: int, min_sample_s: float, progress: "_Progress") -> List[Dict]:
    """One problem: build its inputs and float64 check values once, check every implementation on
    them, time (interleaved) those that passed. One report row per implementation."""
    dev = torch.device(device)
    progress.describe(f"{prob.name}: inputs + float64 check values")
    if _is_selection(prob):
        inp = make_selection_inputs(prob, device, seed)
        expected = expected_selection(inp)
        flops, nbytes = selection_flops(inp), selection_bytes(inp)

        def check(res, inp=inp, expected=expected):
            idx = res if isinstance(res, torch.Tensor) else res[0]
            ok, err, msg = check_selection(idx, inp, expected)
            return dict(ok=ok, max_out_err=err, max_lse_err=None, tol_out=None,
                        checked_tokens=inp.problem.T, reason=msg)

        check_for = lambda impl, c=check: c  # noqa: E731
    else:
        inp = make_inputs(prob, device, seed)
        tokens = check_tokens(prob)
        expected = expected_float64(inp, tokens)
        flops, nbytes = flop_count(prob, inp.kept), byte_count(prob, inp.kept)
        check_for = lambda impl, inp=inp, e=expected, t=tokens: (  # noqa: E731
            lambda res: _check_attention(res, inp, e, t, impl))
    rows, timed = [], []
    for impl in impls:
        row = _row_base(preset, prob, prob.describe(), prob.dtype, device, impl, machine)
        progress.describe(f"{prob.name}: checking {impl.name}")
        fn = check_impl(impl, inp, check_for(impl), dev, row)
        rows.append(row)
        if fn is not None:
            row["status"] = "checked"
            timed.append((fn, row))
        progress.step(f"{prob.name}: {impl.name} {row['status']}")
    time_interleaved(timed, dev, warmup, repeats, min_sample_s, progress, prob.name)
    for r in rows:
        r["flops"], r["bytes"] = flops, nbytes
    return rows


def _limits_at_both_ends(start: Dict, end: Dict) -> Dict:
    """The device's limits measured before and after the run. On a shared machine the load changes
    during a run: fractions use the better of the two measurements (the device can do at least that),
    so they are not inflated by a limit measured during a burst of load."""
    limits = dict(start, start=dict(start), end=end)
    for k in ("matmul_peak_gflops", "copy_gbps"):
        limits[k] = max(start[k], end[k])
    return limits


def _model(problems: List[Case], dev: torch.device) -> Dict[str, str]:
    """The report's statement of what the FLOP / byte figures and the dense baseline count."""
    return dict(
        flops="2*H*(Dqk+Dr)*K_eff + 2*H*Dv*K_eff per query token, K_eff = selected positions kept "
              "(K*block_size, less any cut by causality or the sequence end); selection: "
              "(2*Hi*Di + 2*Hi) per visible (query, key) pair",
        bytes="gathered kv rows (K_eff * Hkv * (Dqk+Dr[+Dv]) * elem) + q + out + indices (int32); "
              "selection: k_idx + q_idx + weights + output indices",
        dense_baseline="mask built from the indices (timed) + F.scaled_dot_product_attention over the "
                       "whole context (float32 on the CPU, upcast untimed; input dtype on a GPU); the "
                       "contiguous copy of the paged cache is untimed; query heads per kv head: "
                       + ", ".join(sorted({f"{getattr(p, 'name', '')}: {sdpa_mode(dev.type, p.H // p.Hkv)}"
                                           for p in problems if not _is_selection(p)})),
    )


def _ints(s: str) -> List[int]:
    """``--context``: comma list of positive lengths, 'k' = 1024 (``8k``, ``1.5k``)."""
    out = []
    for x in s.split(","):
        x = x.strip().lower()
        if not x:
            continue
        mult = 1024 if x.endswith("k") else 1
        try:
            v = float(x[:-1] if mult > 1 else x) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"{x!r} is not a length (e.g. 4096 or 4k)") from None
        if not (v >= 1 and v == int(v)):
            raise argparse.ArgumentTypeError(f"{x!r} is not a positive whole number of positions")
        out.append(int(v))
    if not out:
        raise argparse.ArgumentTypeError("no length given")
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Check, then time, selective attention backends against dense SDPA and peers in one run.",
        epilog="Shape flags override the preset's problems (e.g. --preset dsv32-decode --context 8k,16k). "
               "'--preset custom' starts from the DeepSeek-V3.2 decode shape. See docs/bench.md.")
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS) + ["custom"])
    ap.add_argument("--backends", help="comma-separated backend names (default: every registered backend "
                                       "that runs on the device)")
    ap.add_argument("--no-baselines", action="store_true", help="time the package's backends only")
    ap.add_argument("--device", default=None, type=device_type,
                    help="cpu, cuda or npu (default: the accelerator if present)")
    ap.add_argument("--dtype", choices=sorted(DTYPES))
    ap.add_argument("--out", help="directory for JSON, CSV and PNG results")
    ap.add_argument("--warmup", type=nonnegative_int, default=None,
                    help="untimed calls after the check call (default 1 CPU, 10 GPU)")
    ap.add_argument("--repeats", type=positive_int, default=None, help="timed samples (default 5 CPU, 20 GPU)")
    ap.add_argument("--min-sample-ms", type=nonnegative_float, default=None,
                    help="each sample averages enough calls to last this long (default 5 CPU, 20 GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-plots", action="store_true")
    g = ap.add_argument_group("shape overrides")
    g.add_argument("--context", type=_ints, help="kv length(s), comma list, 'k' = 1024 (one problem each)")
    g.add_argument("--batch", type=positive_int, help="sequences")
    g.add_argument("--tokens", type=positive_int, dest="q_per_seq", help="query tokens per sequence")
    g.add_argument("--heads", type=positive_int, dest="H")
    g.add_argument("--kv-heads", type=positive_int, dest="Hkv")
    g.add_argument("--dqk", type=positive_int, dest="Dqk")
    g.add_argument("--dv", type=positive_int, dest="Dv")
    g.add_argument("--dr", type=nonnegative_int, dest="Dr", help="split rope width (q_rope/kv_rope)")
    g.add_argument("--topk", type=positive_int, dest="K", help="selected tokens (or blocks) per query")
    g.add_argument("--block-size", type=positive_int, dest="block_size")
    g.add_argument("--page-size", type=nonnegative_int, dest="page_size", help="0 = contiguous cache")
    g.add_argument("--causal", dest="causal", action="store_true", default=None)
    g.add_argument("--no-causal", dest="causal", action="store_false")
    g.add_argument("--separate-v", dest="latent", action="store_false", default=None)
    g.add_argument("--per-kv-head-indices", dest="shared_indices", action="store_false", default=None)
    g.add_argument("--kv-quant", dest="kv_quant", choices=["fp8", "int8"],
                   help="quantized cache: kv (and v) in float8_e4m3fn / int8 with float32 scales per 128 values")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, checked as a whole before anything runs: every error here is argparse's (exit 2)."""
    ap = _parser()
    a = ap.parse_args(argv)
    if a.device is not None:
        why = device_unavailable(a.device)
        if why:
            ap.error(f"--device {a.device}: {why}")
    for p in problems_from_args(a):
        why = shape_problem(p)
        if why:
            ap.error(f"{p.name}: {why}")
    if a.out:
        stem = a.preset
        why = dir_problem(a.out) or next(filter(None, (file_problem(os.path.join(a.out, stem + ext))
                                                       for ext in (".json", ".csv"))), None)
        if why:
            ap.error(f"--out {a.out}: {why}")
    return a


def shape_problem(p) -> Optional[str]:
    """What makes a problem (after the flags' overrides) impossible to build, or None. The single-value
    rules are the flags' types; these are the ones that relate two fields."""
    if _is_selection(p):
        return None if p.T <= p.context else f"{p.T} query tokens do not fit in a context of {p.context}"
    if p.H % p.Hkv:
        return f"--heads {p.H} is not a multiple of --kv-heads {p.Hkv}"
    if p.latent and p.Dv > p.Dqk:
        return f"latent value width --dv {p.Dv} exceeds --dqk {p.Dqk} (pass --separate-v for a separate v)"
    if p.q_per_seq > p.context:
        return f"{p.q_per_seq} query tokens per sequence do not fit in a context of {p.context}"
    return None


SELECTION_KEYS = ("q_per_seq", "K")
SHAPE_KEYS = ("batch", "q_per_seq", "H", "Hkv", "Dqk", "Dv", "Dr", "K", "block_size", "page_size", "causal",
              "latent", "shared_indices", "kv_quant")


def problems_from_args(a: argparse.Namespace) -> List[Case]:
    from .presets import dsv32

    if a.preset == "custom":
        base = [dsv32("custom", batch=1, q_per_seq=1, context=4096)]
    else:
        base = list(PRESETS[a.preset])
    over = {k: getattr(a, k) for k in SHAPE_KEYS if getattr(a, k, None) is not None}
    out: List[Case] = []
    for p in base:
        # The indexer + top-k problems take the flags that mean something to them (their H, Dqk are
        # the indexer's, not the attention's): tokens, top-k and dtype.
        q = p.with_overrides(dtype=a.dtype, **({k: over[k] for k in SELECTION_KEYS if k in over}
                                               if _is_selection(p) else over))
        ctxs = a.context or [q.context]
        for c in ctxs:
            out.append(q.with_overrides(context=c))
    # Contexts given on the command line can repeat a preset's list: keep each problem once.
    seen, uniq = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    device = a.device or default_device()
    gpu = device != "cpu"
    pt = PRESET_TIMING.get(a.preset, {}) if not gpu else {}
    # On the CPU the check call already ran once, and nothing is autotuned: one more warm-up call.
    warmup = a.warmup if a.warmup is not None else pt.get("warmup", 10 if gpu else 1)
    repeats = a.repeats if a.repeats is not None else pt.get("repeats", 20 if gpu else 5)
    min_sample = (a.min_sample_ms if a.min_sample_ms is not None else (20 if gpu else 5)) / 1e3
    names = [s.strip() for s in a.backends.split(",")] if a.backends else None
    if names is not None:
        import attention

        known = {b.name for b in attention.backends()}
        unknown = [n for n in names if n not in known]
        if unknown:
            print(f"bench: unknown backend(s) {unknown}; registered: {sorted(known)}", file=sys.stderr)
            return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    problems = problems_from_args(a)
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench: TRITON_INTERPRET is set: Triton kernels run through the interpreter on the CPU; "
              "they are checked, but their times measure the interpreter, not the kernels", file=sys.stderr)
    print(f"bench: preset {a.preset}, {len(problems)} problem(s) on {device}; checking each implementation "
          f"against float64 before timing it", file=sys.stderr, flush=True)
    doc = run(problems, preset=a.preset, device=device, backend_names=names, warmup=warmup, repeats=repeats,
              min_sample_s=min_sample, include_baselines=not a.no_baselines, seed=a.seed,
              quick_limits=pt.get("quick_limits", False),
              command=" ".join(["python -m bench"] + list(sys.argv[1:] if argv is None else argv)))
    print(report.table(doc["results"], doc["limits"], doc["machine"]))
    if a.out:
        stem = a.preset
        written = []
        try:
            os.makedirs(a.out, exist_ok=True)
            report.write_json(os.path.join(a.out, f"{stem}.json"), doc)
            report.write_csv(os.path.join(a.out, f"{stem}.csv"), doc["results"])
            written = [f"{stem}.json", f"{stem}.csv"]
            if not a.no_plots:
                try:
                    written += [os.path.basename(p) for p in report.write_plots(a.out, stem, doc["results"])]
                except ImportError:
                    print("bench: plots skipped: matplotlib is not installed (pip install matplotlib)",
                          file=sys.stderr)
        except OSError as e:  # --out was checked before the run: only a change since then gets here
            print(f"bench: could not write to {a.out}: {e}; the table above is the result", file=sys.stderr)
            return 2
        print(f"\nwrote {', '.join(written)} to {a.out}")
    failed = [r for r in doc["results"] if r["status"] in ("FAIL", "error")]
    if failed:
        print(f"\n{len(failed)} implementation(s) failed the correctness gate or raised: "
              + ", ".join(f"{r['impl']} on {r['problem']}" for r in failed), file=sys.stderr)
        return 1
    return 0
