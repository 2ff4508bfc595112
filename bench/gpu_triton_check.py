"""GPU checks of the Triton backend (the Python part of bench/gpu_check.sh).

    python bench/gpu_triton_check.py matrix --dtype bfloat16 --out OUT   # equivalence matrix on cuda
    python bench/gpu_triton_check.py check --out OUT    # sync-free call, CUDA graph, autotune path
    python bench/gpu_triton_check.py tune --out OUT     # python -m attention.tune on the DeepSeek presets
    python bench/gpu_triton_check.py bench --out OUT    # vs dense SDPA and the matmul peak; writes the report
    python bench/gpu_triton_check.py all --device cpu --out OUT   # dry run: interpreter, tiny shapes (CI)

Every step writes ``OUT/triton_<step>.json``; ``bench`` also writes
``OUT/docs/benchmarks/<gpu>.md`` and ``.json`` from every JSON present. Correctness is checked
before anything is timed, and every ratio is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
os.environ.setdefault("ATTENTION_NAN_FILL", "1")  # unwritten outputs fail the comparisons

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attention  # noqa: E402
from attention import testing, tune  # noqa: E402
from attention.backends.triton import launch  # noqa: E402
from bench.timing import Timing, nan_fill, time_fn  # noqa: E402
from python_ref.quantize import dequantize  # noqa: E402

TARGETS = {"deepseek-prefill": 450.0, "deepseek-decode": 300.0}  # TFLOP/s, bf16 on an H200 (docs/triton.md)
SPEEDUP_TARGET = 5.0  # vs dense flash SDPA at 32K context


def _dev_name(device: str) -> str:
    return launch.device_name(torch.device(device))


def _write(out: Path, step: str, data: dict) -> None:
    """Replace OUT/triton_<step>.json atomically: gpu_check.sh packs results while steps still run,
    and a step killed mid-write must leave the previous version, not half a file."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"triton_{step}.json"
    tmp = out / f".{path.name}.tmp"
    # Versions of what was imported (triton's is read here, after import, not guessed beforehand).
    data = dict(data, versions=dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version()))
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# Samples per timing: a median of at least this many, however slow a call (a prefill call can take
# longer than triton.testing.do_bench's whole default window, which then times it once).
MIN_SAMPLES = 15


def _bench(fn, device: str, samples: int = 0) -> Timing:
    """Median of ``samples`` samples (default MIN_SAMPLES on a GPU, 3 in the interpreter's dry run;
    each sample at least 1 ms of back-to-back calls, CUDA events on a GPU), without the NaN fill."""
    cuda = device == "cuda"
    with nan_fill(False):
        return time_fn(fn, torch.device(device), warmup=3 if cuda else 1,
                       repeats=samples or (MIN_SAMPLES if cuda else 3), min_sample_s=1e-3 if cuda else 0.0,
                       max_inner=100)


# ---------------------------------------------------------------------------------------------
def _noop(partial: dict) -> None:
    pass


def step_matrix(device: str, dtypes, cases=None, save=_noop) -> dict:
    """``save`` gets the result so far after every case (the step may be killed at its time limit)."""
    rows = []
    cases = cases or testing.CASES
    t0 = time.time()

    def result():
        passed = sum(1 for r in rows if r["ok"] and not r.get("skipped"))
        return dict(device=_dev_name(device), passed=passed, failed=sum(1 for r in rows if not r["ok"]),
                    skipped=sum(1 for r in rows if r.get("skipped")), seconds=round(time.time() - t0, 1),
                    rows=rows)

    for dt in dtypes:
        for case in cases:
            try:
                r = testing.run_case("triton", case, dt, device, repeats=2)
                rows.append(r.as_dict())
            except Exception as e:
                rows.append(dict(backend="triton", case=case.name, dtype=testing.DTYPE_NAMES[dt], ok=False,
                                 message=f"{type(e).__name__}: {e}"))
            r = rows[-1]
            print(f"  {'ok ' if r['ok'] else 'FAIL'} {r['dtype']:9s} {r['case']:32s} {r.get('message', '')}", flush=True)
            save(result())
    return result()


def step_check(device: str, save=_noop) -> dict:
    """No host sync in a call; capture + replay in a CUDA graph; the opt-in triton.autotune path.
    ``save`` gets the results after every sub-check (autotune compiles 16 configs: it may be cut)."""
    res = {}
    case = testing.CASES_BY_NAME["paged_latent_rope_sink_causal"]
    dt = torch.bfloat16
    args = case.make(dt, device)
    ref_out, ref_lse = testing.oracle(args)
    tol = testing.TOLERANCES[dt]

    def call():
        return attention.selective_attention(**args, backend="triton", return_lse=True)

    out, lse = call()
    _sync(device)
    err_o, err_l = testing.max_error(out, ref_out), testing.max_error(lse, ref_lse)
    res["correct"] = dict(ok=err_o <= tol[0] and err_l <= tol[1], out_err=err_o, lse_err=err_l)
    save(res)
    if device == "cuda":
        # Two inputs: the matrix's paged/rope/sink/causal case (one kernel) and a decode shape whose
        # plan splits the candidates (kernel + combine, with partial buffers allocated per call).
        decode = tune.Problem("graph-decode", batch=2, q_per_seq=1, context=2048, H=16, Hkv=1, Dqk=576, Dv=512,
                              K=1024, page_size=64, causal=True)
        inputs = {"paged_rope_sink_causal": args, "decode_split": tune.make_inputs(decode, device)}
        plan = launch.plan(attention.validate(**inputs["decode_split"]),
                           launch.resolve_config(attention.validate(**inputs["decode_split"]))[0])
        res["decode_split_plan"] = dict(ok=plan["num_splits"] > 1, num_splits=plan["num_splits"])
        save(res)
        for name, a in inputs.items():
            attention.selective_attention(**a, backend="triton", return_lse=True)  # compile first
            torch.cuda.synchronize()
            try:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    attention.selective_attention(**a, backend="triton", return_lse=True)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
                res[f"sync_free_{name}"] = dict(ok=True)
            except Exception as e:
                res[f"sync_free_{name}"] = dict(ok=False, error=f"{type(e).__name__}: {e}")
            try:
                static_q = a["q"].clone()
                a2 = dict(a, q=static_q)
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    attention.selective_attention(**a2, backend="triton", return_lse=True)  # warm-up
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    g_out, g_lse = attention.selective_attention(**a2, backend="triton", return_lse=True)
                static_q.mul_(0.5)  # new data in the captured input: the replay must see it
                g.replay()
                torch.cuda.synchronize()
                e_out, e_lse = attention.selective_attention(**a2, backend="triton", return_lse=True)
                same = torch.equal(g_out, e_out) and torch.equal(g_lse, e_lse)
                res[f"cuda_graph_{name}"] = dict(ok=bool(same), replay_matches_eager=bool(same))
            except Exception as e:
                res[f"cuda_graph_{name}"] = dict(ok=False, error=f"{type(e).__name__}: {e}",
                                                 trace=traceback.format_exc()[-2000:])
            save(res)
        try:
            os.environ["ATTENTION_TRITON_AUTOTUNE"] = "1"
            a3 = testing.CASES_BY_NAME["deepseek_widths"].make(dt, device)
            inp = attention.validate(**a3)
            o3, l3 = launch.forward(inp, autotune=True)
            r3, rl3 = testing.oracle(a3)
            err = testing.max_error(o3, r3)
            res["autotune"] = dict(ok=err <= tol[0], out_err=err,
                                   best=str(getattr(launch._autotuned_kernel(), "best_config", None)))
        except Exception as e:
            res["autotune"] = dict(ok=False, error=f"{type(e).__name__}: {e}")
        finally:
            os.environ.pop("ATTENTION_TRITON_AUTOTUNE", None)
    else:
        res["sync_free"] = dict(ok=None, note="no GPU: covered on CPU by tests/test_triton_kernels.py::test_host_path_reads_no_device_data")
        res["cuda_graph"] = dict(ok=None, note="no GPU")
        res["autotune"] = dict(ok=None, note="no GPU (triton.autotune benchmarks with CUDA events)")
    return res


def step_tune(device: str, presets, save=_noop) -> dict:
    rows = []
    for p in presets:
        try:
            # Timings without the NaN fill; the matrix step checks the kernels with it.
            with nan_fill(False):
                rows.append(tune.tune_preset(tune.PRESETS[p], device, repeats=5 if device == "cuda" else 1,
                                             save=True))
        except Exception as e:
            rows.append(dict(preset=p, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:]))
        save(dict(device=_dev_name(device), rows=rows))
    ok = [r for r in rows if "error" not in r]
    if ok:
        print(tune.format_table(ok))
    return dict(device=_dev_name(device), rows=rows)


def _dense_inputs(args: dict, preset: tune.Problem):
    """Dense q/k/v [B, heads, L, D] holding the same data as the sparse call."""
    q, kv = args["q"], args["kv"]
    if args.get("kv_scale") is not None:  # a quantized cache: dense SDPA reads its values in q's dtype
        kv = dequantize(kv, args["kv_scale"], args.get("scale_block", 128), q.dtype)
    if args.get("q_rope") is not None:  # the rope part joins the key (and the query) as in a 576-wide row
        q, kv = torch.cat([q, args["q_rope"]], -1), torch.cat([kv, args["kv_rope"].to(kv.dtype)], -1)
    B, lq, L = preset.batch, preset.q_per_seq, preset.context
    if "block_table" in args:
        kvd = kv[args["block_table"].long()].reshape(B, -1, kv.shape[-2], kv.shape[-1])[:, :L]
    else:
        kvd = kv.view(B, L, kv.shape[-2], kv.shape[-1])
    k = kvd.permute(0, 2, 1, 3).contiguous()
    v = k[..., :preset.Dv].contiguous()
    qd = q.view(B, lq, q.shape[1], q.shape[2]).permute(0, 2, 1, 3).contiguous()
    return qd, k, v


def _sdpa(qd, k, v, causal: bool, scale: float):
    """Dense SDPA on the same data, flash backend first; returns (fn, backend name) or (None, reasons).

    Flash (and cudnn) refuse head width 576 and Dv != Dqk, so on the DeepSeek shapes a later backend
    runs and the report names it. One kv head and no causal mask (decode): the heads are folded into
    the query length, which is exact and avoids GQA expansion (the math backend would materialise
    128 copies of a 32K cache).
    """
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    B, H, lq, D = qd.shape
    fold = k.shape[1] == 1 and H > 1 and not (causal and lq > 1)
    q_in = qd.reshape(B, 1, H * lq, D) if fold else qd
    gqa = (not fold) and k.shape[1] != H
    tried = []
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH):
        def fn(be=be):
            with sdpa_kernel([be]):
                kw = dict(enable_gqa=True) if gqa else {}
                if causal and lq > 1 and lq != k.shape[2]:
                    # SPEC causal is bottom-right aligned; SDPA's is_causal is top-left.
                    from torch.nn.attention.bias import causal_lower_right

                    kw["attn_mask"] = causal_lower_right(lq, k.shape[2])
                else:
                    kw["is_causal"] = causal and lq > 1
                return F.scaled_dot_product_attention(q_in, k, v, scale=scale, **kw)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "flash not used because...": the reason is recorded below
                fn()
            note = "; ".join(tried)
            return fn, be.name + (" (heads folded into queries)" if fold else "") + (f" [refused: {note}]" if note else "")
        except Exception as e:
            tried.append(f"{be.name}: {str(e).splitlines()[0][:100] if str(e) else type(e).__name__}")
            if qd.is_cuda:
                torch.cuda.empty_cache()
    return None, "; ".join(tried)


def matmul_peak(device: str) -> float:
    n = 8192 if device == "cuda" else 256
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    return 2 * n**3 / (_bench(lambda: a @ b, device).median_ms * 1e-3) / 1e12


def flops_all_candidates(args: dict) -> float:
    """FLOPs counting every one of the K candidates of every query token, kept or not: FlashMLA's
    convention (its sparse prefill figures count all top-k entries). ``tune.flops`` counts kept ones."""
    q, idx = args["q"], args["indices"]
    T, H, Dqk = q.shape
    Dqk += args["q_rope"].shape[-1] if args.get("q_rope") is not None else 0
    return 2.0 * T * H * idx.shape[-1] * args.get("block_size", 1) * (Dqk + args.get("d_v", Dqk))


def step_bench(device: str, presets, save=_noop) -> dict:
    rows = []
    peak = matmul_peak(device)
    print(f"matmul peak ({'bf16 8192^3' if device == 'cuda' else 'fp32 256^3'}, median): {peak:.1f} TFLOP/s", flush=True)

    def result():
        return dict(device=_dev_name(device), matmul_peak_tflops=peak, rows=rows,
                    timing=f"median of {MIN_SAMPLES if device == 'cuda' else 3} samples, NaN fill off")

    for name in presets:
        p = tune.PRESETS[name]
        row = dict(preset=name, description=p.description)
        try:
            args = tune.make_inputs(p, device)
            inp = attention.validate(**args)
            fl_kept, fl_all = tune.flops(args), flops_all_candidates(args)
            out, _ = launch.forward(inp)  # checked with the NaN fill on: an unwritten element fails
            ref, _ = attention.get_backend("reference").forward(inp)
            err = testing.max_error(out, ref)
            tol = testing.TOLERANCES[inp.dtype][0]
            row.update(max_err_vs_reference=err, correct=err <= tol, config=launch.resolve_config(inp)[1],
                       plan={k: v for k, v in launch.plan(inp, launch.resolve_config(inp)[0]).items()})
            if not err <= tol:
                raise RuntimeError(f"triton differs from the reference by {err:.3g} > {tol}: not timed")
            tk = _bench(lambda: launch.forward(inp), device)
            t_op = _bench(lambda: attention.selective_attention(**args, backend="triton"), device)
            t_kernel = tk.median_ms * 1e-3
            row.update(us_kernel=t_kernel * 1e6, us_kernel_min=tk.min_ms * 1e3, samples=len(tk.samples_ms),
                       calls_per_sample=tk.inner, us_op=t_op.median_ms * 1e3,
                       tflops_kept=fl_kept / t_kernel / 1e12, tflops_all_k=fl_all / t_kernel / 1e12,
                       kept_fraction=fl_kept / fl_all if fl_all else None,
                       pct_of_matmul_peak=100 * fl_kept / t_kernel / 1e12 / peak)
            del ref, out
            qd, k, v = _dense_inputs(args, p)
            fn, be = _sdpa(qd, k, v, p.causal, inp.sm_scale)
            if fn is None:
                row.update(dense_backend=None, dense_error=be)
            else:
                t_dense = _bench(fn, device).median_ms * 1e-3
                L, lq, B = p.context, p.q_per_seq, p.batch
                pairs = B * (lq * L - (lq * (lq - 1)) // 2 if p.causal and lq > 1 else lq * L)
                dense_fl = 2.0 * pairs * p.H * (p.Dqk + p.Dr + p.Dv)
                row.update(dense_backend=be, us_dense=t_dense * 1e6, dense_tflops=dense_fl / t_dense / 1e12,
                           speedup_vs_dense=t_dense / t_kernel)
            del qd, k, v
            tgt = TARGETS.get(name)
            if tgt is not None:
                # Judged on kept candidates (the work that was useful); all-K is FlashMLA's convention.
                row["target_tflops"] = tgt
                row["meets_tflops_target"] = row["tflops_kept"] >= tgt
            if p.context >= 32768 and "speedup_vs_dense" in row:
                row["meets_speedup_target"] = row["speedup_vs_dense"] >= SPEEDUP_TARGET
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}, default=str), flush=True)
        save(result())
        if device == "cuda":
            torch.cuda.empty_cache()
    return result()


# ---------------------------------------------------------------------------------------------
def write_report(out: Path, device: str) -> Path:
    """docs/benchmarks/<gpu>.md and .json from every step's JSON found in ``out``."""
    steps = {}
    for f in sorted(out.glob("triton_*.json")):
        steps[f.stem[len("triton_"):]] = json.loads(f.read_text())
    name = _dev_name(device)
    from attention.tuning import slug

    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    d = out / "docs" / "benchmarks"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{slug(name)}.json").write_text(json.dumps(dict(meta=meta, **steps), indent=1, default=str))
    L = [f"# Triton backend on {name}", "",
         f"torch {meta['torch']}, triton {meta['triton']}, {meta['when']}"
         + (" - **dry run on the Triton interpreter: timings mean nothing**" if meta["interpreter"] else ""), ""]
    for k, v in steps.items():
        if k.startswith("matrix"):
            L.append(f"- equivalence matrix ({k}): {v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped "
                     f"in {v['seconds']} s")
            L += [f"  - FAIL {r['dtype']} {r['case']}: {r.get('message', '')}" for r in v["rows"] if not r["ok"]]
    if "check" in steps:
        for k, v in steps["check"].items():
            if k == "versions":
                continue
            L.append(f"- {k}: {'ok' if v.get('ok') else ('not run' if v.get('ok') is None else 'FAILED')} "
                     f"{ {x: y for x, y in v.items() if x not in ('ok', 'trace')} }")
    if "tune" in steps:
        rows = [r for r in steps["tune"]["rows"] if "error" not in r]
        if rows:
            L += ["", "## Tuning (python -m attention.tune)", "", "```", tune.format_table(rows), "```"]
        L += [f"- tune {r['preset']} FAILED: {r['error']}" for r in steps["tune"]["rows"] if "error" in r]
    if "bench" in steps:
        b = steps["bench"]
        L += ["", "## Benchmarks", "", f"Matmul peak measured in this run: {b['matmul_peak_tflops']:.1f} TFLOP/s. "
              f"Times: {b.get('timing', '')}. TF/s (kept) counts the candidates that survive -1 padding, "
              "the sequence end and causality; TF/s (all K) counts all K per query token, as FlashMLA reports.",
              "",
              "| preset | correct | kernel us | op us | TF/s (kept) | TF/s (all K) | % peak (kept) | target (kept) "
              "| dense backend | dense us | speedup |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            if "error" in r:
                L.append(f"| {r['preset']} | error: {r['error'][:100]} ||||||||||")
                continue
            f = lambda x, fmt="{:.1f}": "-" if x is None else fmt.format(x)  # noqa: E731
            L.append(f"| {r['preset']} | {r.get('correct')} ({r.get('max_err_vs_reference', 0):.2g}) | "
                     f"{f(r.get('us_kernel'))} | {f(r.get('us_op'))} | {f(r.get('tflops_kept'), '{:.2f}')} | "
                     f"{f(r.get('tflops_all_k'), '{:.2f}')} | "
                     f"{f(r.get('pct_of_matmul_peak'))} | {r.get('target_tflops', '-')} "
                     f"{'met' if r.get('meets_tflops_target') else ('missed' if 'meets_tflops_target' in r else '')} | "
                     f"{(r.get('dense_backend') or 'none').split(' [')[0]} | {f(r.get('us_dense'))} | "
                     f"{f(r.get('speedup_vs_dense'), '{:.2f}x')} |")
        L.append("")
        for r in b["rows"]:
            if r.get("dense_backend") and " [" in r["dense_backend"]:
                L.append(f"- {r['preset']}: dense SDPA {r['dense_backend']}")
            elif r.get("dense_error"):
                L.append(f"- {r['preset']}: no dense SDPA backend ran: {r['dense_error']}")
    path = d / f"{slug(name)}.md"
    path.write_text("\n".join(L) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["matrix", "check", "tune", "bench", "report", "all"])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", action="append", choices=list(testing.DTYPE_NAMES.values()))
    ap.add_argument("--preset", action="append", choices=sorted(tune.PRESETS))
    ap.add_argument("--out", default=os.environ.get("OUT") or "out")
    a = ap.parse_args(argv)
    out = Path(a.out)
    device = a.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no GPU visible: use --device cpu for the dry run", file=sys.stderr)
        return 2
    by_name = {v: k for k, v in testing.DTYPE_NAMES.items()}
    dtypes = [by_name[d] for d in (a.dtype or list(testing.DTYPE_NAMES.values()))]
    presets = a.preset or (list(tune.GPU_PRESETS) if device == "cuda" else ["tiny"])
    bench_presets = a.preset or (list(tune.GPU_BENCH_PRESETS) if device == "cuda" else ["tiny"])
    rc = 0
    if a.step in ("matrix", "all"):
        # The dry run covers a slice of the matrix: tests/test_equivalence.py runs all of it on the CPU.
        cases = None if device == "cuda" else [testing.CASES_BY_NAME["paged_varlen"]]
        name = "matrix_" + "_".join(testing.DTYPE_NAMES[d] for d in dtypes)
        r = step_matrix(device, dtypes, cases, save=lambda part: _write(out, name, part))
        _write(out, name, r)
        rc |= int(r["failed"] > 0)
    if a.step in ("check", "all"):
        r = step_check(device, save=lambda part: _write(out, "check", part))
        _write(out, "check", r)
        rc |= int(any(v.get("ok") is False for v in r.values()))
    if a.step in ("tune", "all"):
        r = step_tune(device, presets, save=lambda part: _write(out, "tune", part))
        _write(out, "tune", r)
        rc |= int(any("error" in x for x in r["rows"]))
    if a.step in ("bench", "all"):
        r = step_bench(device, bench_presets, save=lambda part: _write(out, "bench", part))
        _write(out, "bench", r)
        rc |= int(any("error" in x or x.get("correct") is False for x in r["rows"]))
    if a.step in ("bench", "report", "all"):
        print(f"report: {write_report(out, device)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
