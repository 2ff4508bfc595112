"""GPU checks of selection: exactness first, then time, at DeepSeek-V3.2's 128K context.

Called by bench/gpu_check.sh on a machine with an NVIDIA GPU (after ``python csrc/cuda/build_ext.py``
built ``attention._cuda_topk`` in place). It imports the package from the checkout it lives in, so it
needs no install; without the extension the CUDA top-k checks are reported as not run. Writes ``selection_check.json`` and
``selection_check.txt`` under ``$OUT`` (else ./out) and exits non-zero when a correctness check fails.
Targets are reported, not enforced: H200 top-2048 of 128K-wide rows >= 3x faster than torch.topk;
fused select >= 1.5x faster than lightning_indexer + torch.topk.

    python bench/gpu_selection_check.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(fn, reps: int = 20, warmup: int = 0) -> float:
    """Median milliseconds of fn() with CUDA events (wall clock in the CPU dry run), without the NaN fill."""
    from bench.timing import nan_fill

    with nan_fill(False):
        # The CPU dry run has nothing to warm up (the interpreter does not compile) and times once.
        return _time_filled(fn, reps, warmup or (3 if torch.cuda.is_available() else 0))


def _time_filled(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    if not torch.cuda.is_available():
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]
    torch.cuda.synchronize()
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def _same_selection(idx_a, idx_b, scores):
    """Exact index equality, and (for reporting) whether a mismatch is only a near tie."""
    exact = bool(torch.equal(idx_a, idx_b))
    if exact:
        return True, 0.0
    sa = scores.gather(1, idx_a.view(idx_a.shape[0], -1).clamp_min(0).long())
    sb = scores.gather(1, idx_b.view(idx_b.shape[0], -1).clamp_min(0).long())
    return False, float((sa - sb).abs().max())


class _Run:
    """What every step shares: the device, the shapes, one generator (drawn from by the steps in
    order) and the report (``res``'s checks and timings, the names of failed checks)."""

    def __init__(self, dry: bool, quick: bool, res: dict):
        self.dry, self.quick, self.res = dry, quick, res
        self.dev = torch.device("cpu" if dry else "cuda")
        self.reps = 1 if dry else (5 if quick else 20)  # the interpreter's select takes seconds per call
        self.W, self.k = (256, 16) if dry else (131072, 2048)
        self.Hi, self.Di = (8, 32) if dry else (64, 128)
        self.g = torch.Generator(device=self.dev).manual_seed(0)
        self.have_cuda_topk = res["cuda_topk"] == "available"
        self.failures: list = []

    def check(self, name, ok, **extra):
        self.res["checks"].append(dict(name=name, ok=bool(ok), **extra))
        print(f"  [{'ok' if ok else 'FAIL'}] {name} {extra if extra else ''}", flush=True)
        if not ok:
            self.failures.append(name)

    def timing(self, row: dict):
        self.res["timings"].append(row)
        print(f"    {row}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny shapes on CPU tensors (Triton interpreter) to test this script without a GPU")
    a = ap.parse_args(argv)
    out_dir = os.environ.get("OUT") or "out"
    os.makedirs(out_dir, exist_ok=True)
    if a.cpu_dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("gpu_selection_check: no CUDA device; nothing to check")
        return 0

    # The checkout this script belongs to, whether or not (or whatever) pip installed.
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import attention
    import triton  # imported by attention already; its version is read after that import

    dry = a.cpu_dry_run
    res = dict(device="cpu (dry run)" if dry else torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, attention_from=os.path.dirname(os.path.abspath(attention.__file__)),
               cuda_topk="; ".join(attention.get_backend("cuda").unavailable_reasons()) or "available",
               checks=[], timings=[])
    run = _Run(dry, a.quick, res)
    _check_topk(run)
    _check_select(run)
    _check_paged_decode(run)
    _check_serving_indexer(run)
    res["failures"] = run.failures
    _write_report(res, out_dir)
    return 1 if run.failures else 0


def _check_topk(run: _Run) -> None:
    """[1] top-k exactness: the CUDA kernel against the reference order and torch.topk's values, then time."""
    import attention
    import python_ref
    from attention.backends import cuda as cuda_topk  # the module: cuda_topk._ext is timed raw below

    print("[1] topk_indices: CUDA top-k (histogram + finish), 128K-wide rows, k=2048", flush=True)
    dev, g, W, k, reps = run.dev, run.g, run.W, run.k, run.reps
    for rows in ([1, 3] if run.dry else [1, 64] if run.quick else [1, 64, 512]):
        s = torch.randn(rows, W, device=dev, generator=g)
        s[0, W // 2:] = float("-inf")  # a row with invalid tail
        if rows > 1:
            s[1] = torch.randint(-3, 4, (W,), device=dev, generator=g).float()  # massive ties
        ref = python_ref.topk_indices(s, k)  # packed-key reference (torch ops on the GPU)
        oracle_rows = min(rows, 4)
        oracle = python_ref.topk_indices_dense(s[:oracle_rows].cpu(), k)
        run.check(f"reference == float64 stable-sort oracle rows={oracle_rows}",
                  torch.equal(ref[:oracle_rows].cpu(), oracle))
        if run.have_cuda_topk:
            got = attention.topk_indices(s, k, backend="cuda")
            run.check(f"cuda topk == reference rows={rows}", torch.equal(got, ref))
            tv = torch.topk(s, k, dim=1).values
            gv = s.gather(1, got.view(rows, k).clamp_min(0).long())
            gv = torch.where(got.view(rows, k) >= 0, gv, float("-inf"))
            run.check(f"cuda topk values == torch.topk values rows={rows}", torch.equal(gv, tv))
        t_torch = _time(lambda: torch.topk(s, k, dim=1), reps)
        row = dict(what="topk", rows=rows, W=W, k=k, torch_topk_ms=round(t_torch, 4))
        if run.have_cuda_topk:
            t_cuda = _time(lambda: attention.topk_indices(s, k, backend="cuda"), reps)
            t_raw = _time(lambda: cuda_topk._ext.topk_indices(s, k), reps)
            row.update(cuda_ms=round(t_cuda, 4), cuda_raw_ms=round(t_raw, 4), speedup=round(t_torch / t_raw, 2),
                       target="3x")
        run.timing(row)


def _check_select(run: _Run) -> None:
    """[2] the Triton indexer's scores against the reference, and fused select against indexer + torch.topk."""
    import attention
    import python_ref

    print("[2] lightning_indexer + select: DeepSeek-V3.2 indexer (Hi=64, Di=128), 128K context", flush=True)
    dev, g, L, k, reps, Hi, Di = run.dev, run.g, run.W, run.k, run.reps, run.Hi, run.Di
    for T, dtype in ([(1, torch.float32)] if run.dry and run.quick else
                     [(2, torch.float32), (3, torch.bfloat16)] if run.dry else
                     [(4, torch.float32), (64, torch.bfloat16)] if run.quick else
                     [(4, torch.float32), (64, torch.float32), (64, torch.bfloat16), (512, torch.bfloat16)]):
        q = torch.randn(T, Hi, Di, device=dev, generator=g).to(dtype)
        kx = torch.randn(L, Di, device=dev, generator=g).to(dtype)
        w = torch.randn(T, Hi, device=dev, generator=g) * Hi ** -0.5
        kw = dict(max_seqlen_k=L)
        name = f"T={T} {str(dtype).replace('torch.', '')}"
        try:
            s_tri = attention.lightning_indexer(q, kx, w, backend="triton", **kw)
            s_ref = attention.lightning_indexer(q, kx, w, backend="reference", **kw)
            err = _relative_error(s_tri, s_ref)
            run.check(f"triton indexer ~ reference {name}", torch.equal(torch.isinf(s_tri), torch.isinf(s_ref)) and
                      err < (1e-5 if dtype == torch.float32 else 2e-2), rel_err=err)
            sel_tri = attention.select(q, kx, w, k, backend="triton", **kw)
            sel_ref = python_ref.topk_indices(s_tri, k)  # same scores' exact order
            exact, gap = _same_selection(sel_tri, sel_ref, s_ref)
            # Different summation order than the unfused path: a mismatch is allowed only at near ties.
            run.check(f"triton select == topk(triton scores) {name}", exact or gap < 1e-4, exact=exact, score_gap=gap)
            t_idx = _time(lambda: attention.lightning_indexer(q, kx, w, backend="triton", **kw), reps)
            t_unfused = _time(lambda: torch.topk(attention.lightning_indexer(q, kx, w, backend="triton", **kw), k,
                                                 dim=1), reps)
            t_fused = _time(lambda: attention.select(q, kx, w, k, backend="triton", **kw), reps)
            run.timing(dict(what="select", T=T, L=L, Hi=Hi, Di=Di, k=k, dtype=str(dtype), indexer_ms=round(t_idx, 4),
                            indexer_plus_torch_topk_ms=round(t_unfused, 4), fused_select_ms=round(t_fused, 4),
                            speedup=round(t_unfused / t_fused, 2), target="1.5x"))
        except Exception as e:  # report and continue: one broken shape must not hide the others
            traceback.print_exc()
            run.check(f"select run {name}", False, error=repr(e)[:500])


def _check_paged_decode(run: _Run) -> None:
    """[3] paged + varlen decode through select on the GPU, Triton against the reference."""
    import attention

    print("[3] decode on a paged cache: select -> selective_attention (triton vs reference)", flush=True)
    dev, g, k, Hi, Di = run.dev, run.g, run.k, run.Hi, run.Di
    try:
        B, page, Lmax = (4, 16, 128) if run.dry else (4, 64, 8192)
        lens = torch.tensor([Lmax, Lmax * 5 // 8, 77, 16], device=dev, dtype=torch.int32)
        pages = (lens + page - 1) // page
        P = int(pages.sum()) + 3
        table = torch.full((B, Lmax // page), -1, device=dev, dtype=torch.int32)
        perm = torch.randperm(P, device=dev, generator=g)
        j = 0
        for b in range(B):
            n = int(pages[b])
            table[b, :n] = perm[j:j + n].to(torch.int32)
            j += n
        kx = torch.randn(P, page, Di, device=dev, generator=g)
        q = torch.randn(B, Hi, Di, device=dev, generator=g)
        w = torch.randn(B, Hi, device=dev, generator=g)
        cu = torch.arange(B + 1, device=dev, dtype=torch.int32)
        kw = dict(cu_seqlens_q=cu, block_table=table, seqlens_k=lens, max_seqlen_k=Lmax)
        a_tri = attention.select(q, kx, w, k, backend="triton", **kw)
        a_ref = attention.select(q, kx, w, k, backend="reference", **kw)
        s_ref = attention.lightning_indexer(q, kx, w, backend="reference", **kw)
        exact, gap = _same_selection(a_tri, a_ref, s_ref)
        run.check("paged varlen decode select triton == reference", exact or gap < 1e-4, exact=exact, score_gap=gap)
    except Exception as e:
        traceback.print_exc()
        run.check("paged varlen decode select", False, error=repr(e)[:500])


def _check_serving_indexer(run: _Run) -> None:
    """[4] the indexer as serving engines call it: fp8 / int8 q_idx / k_idx with scales, key windows
    (Triton against the reference), and the CUDA top-k with per-row lengths."""
    import attention
    import python_ref

    print("[4] serving indexer: fp8/int8 q_idx/k_idx + scales, windows (triton vs reference), top-k lengths",
          flush=True)
    dev, g, W, k, reps, Hi, Di = run.dev, run.g, run.W, run.k, run.reps, run.Hi, run.Di
    T = 3 if run.dry else 64
    q32 = torch.randn(T, Hi, Di, device=dev, generator=g)
    k32 = torch.randn(W, Di, device=dev, generator=g)
    w = torch.randn(T, Hi, device=dev, generator=g) * Hi ** -0.5
    ks = torch.randint(0, W // 2, (T,), device=dev, generator=g, dtype=torch.int32)
    ke = torch.minimum(ks + torch.randint(1, W, (T,), device=dev, generator=g, dtype=torch.int32),
                       torch.full_like(ks, W))
    for qdt in (torch.float8_e4m3fn, torch.int8):
        name = f"{str(qdt).replace('torch.', '')} T={T} W={W}"
        try:
            q8, qs = attention.quantize_kv(q32, qdt, Di)  # one scale per row: DeepGEMM's per-token cast
            k8, kscale = attention.quantize_kv(k32, qdt, Di)
            kw = dict(q_idx_scale=qs, k_idx_scale=kscale, cu_seqlen_ks=ks, cu_seqlen_ke=ke, causal=False,
                      max_seqlen_k=W)
            s_tri = attention.lightning_indexer(q8, k8, w, backend="triton", **kw)
            s_ref = attention.lightning_indexer(q8, k8, w, backend="reference", **kw)
            err = _relative_error(s_tri, s_ref)
            run.check(f"triton quantized indexer ~ reference {name}",
                      torch.equal(torch.isinf(s_tri), torch.isinf(s_ref)) and err < 1e-4, rel_err=err)
            sel_tri = attention.select(q8, k8, w, k, backend="triton", **kw)
            exact, gap = _same_selection(sel_tri, python_ref.topk_indices(s_tri, k), s_ref)
            run.check(f"triton quantized select == topk(triton scores) {name}", exact or gap < 1e-4, exact=exact,
                      score_gap=gap)
            t_q = _time(lambda: attention.select(q8, k8, w, k, backend="triton", **kw), reps)
            bf = dict(cu_seqlen_ks=ks, cu_seqlen_ke=ke, causal=False, max_seqlen_k=W)
            qb, kb = q32.bfloat16(), k32.bfloat16()
            t_b = _time(lambda: attention.select(qb, kb, w, k, backend="triton", **bf), reps)
            run.timing(dict(what="select_quantized", dtype=str(qdt), T=T, W=W, k=k, select_ms=round(t_q, 4),
                            bf16_select_ms=round(t_b, 4)))
        except Exception as e:
            traceback.print_exc()
            run.check(f"quantized indexer {name}", False, error=repr(e)[:500])
    if run.have_cuda_topk:
        s = torch.randn(T, W, device=dev, generator=g)
        lengths = torch.randint(0, W + 1, (T,), device=dev, generator=g, dtype=torch.int32)
        lengths[0] = min(k, W)
        got = attention.topk_indices(s, k, lengths=lengths, backend="cuda")
        run.check(f"cuda topk with lengths == reference rows={T}",
                  torch.equal(got, python_ref.topk_indices(s, k, lengths)))


def _relative_error(s_tri, s_ref) -> float:
    """max |s_tri - s_ref| over the reference's finite scores, relative to its largest one."""
    fin = torch.isfinite(s_ref)
    return float((s_tri - s_ref)[fin].abs().max() / s_ref[fin].abs().max().clamp_min(1e-6))


def _write_report(res: dict, out_dir: str) -> None:
    """selection_check.json (everything) and selection_check.txt (the table), also printed."""
    with open(os.path.join(out_dir, "selection_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    failures = res["failures"]
    lines = [f"selection GPU check on {res['device']} (torch {res['torch']}, triton {res['triton']}); "
             f"cuda_topk: {res['cuda_topk']}", ""]
    for r in res["timings"]:
        lines.append("  " + "  ".join(f"{k}={v}" for k, v in r.items()))
    lines.append("")
    lines.append(f"checks: {sum(c['ok'] for c in res['checks'])}/{len(res['checks'])} ok"
                 + (f"; FAILED: {', '.join(failures)}" if failures else ""))
    txt = "\n".join(lines)
    with open(os.path.join(out_dir, "selection_check.txt"), "w") as f:
        f.write(txt + "\n")
    print("\n" + txt)


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"gpu_selection_check: {time.time() - t0:.1f}s")
    sys.exit(rc)
