"""The Triton backward: gradients of every differentiable input against autograd through the
float64 oracle, the deterministic mode's repeats, exact zeros for storage no candidate names,
finite differences, and a compiled training step.

Runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py), or on a GPU when there is one.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import attention
import python_ref
from attention.testing import CASES_BY_NAME, DTYPE_NAMES, oracle, same_bits

triton = pytest.importorskip("triton")

from attention.backends.triton import BACKEND  # noqa: E402
from attention.backends.triton import backward as bwd  # noqa: E402
from attention.backends.triton import backward_kernels as bwd_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not BACKEND.test_devices(), reason="triton backend cannot run here")

DIFF = ("q", "kv", "v", "q_rope", "kv_rope", "attn_sink")
# max |grad - ref| <= tol * max(1, max |ref|) per dtype. float32: the reference backward's own
# bound (tests/test_op.py). Half precision: inputs are rounded to the dtype, dots take fp16/bf16
# operands on a GPU (P, dS rounded once), and gradients are rounded to the input dtype at the end:
# bf16's 8-bit mantissa alone is 4e-3 relative; accumulated over K candidates, 3e-2 (SPEC's bf16 out bound).
GRAD_TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}

# The matrix cases that make sense for training: latent/separate V, GQA with fewer than 16 heads per
# kv head (the head block is padded), shared indices, rope, sink, token and block selection, paged and
# contiguous varlen, causal, duplicates, K = 0 rows, all candidates dropped, NaN-filled unused storage
# (every case plants it), strided inputs, DeepSeek's 576/512 widths.
F32_CASES = ["mqa_latent", "gqa_separate_v", "gqa_shared_indices", "gqa_separate_v_shared_indices",
             "rope_separate_v", "block2", "block_causal_varlen", "varlen_empty_sequence", "paged_varlen",
             "paged_latent_rope_sink_causal", "paged_block_spans_pages", "paged_separate_v_gqa", "sink_all_dropped",
             "duplicates", "k_zero", "odd_widths", "deepseek_widths", "negative_scale", "strided_inputs", "empty_cache"]
HALF_CASES = ["gqa_separate_v", "paged_latent_rope_sink_causal", "block_causal_varlen", "deepseek_widths"]
MATRIX = [(c, torch.float32) for c in F32_CASES] + [(c, d) for c in HALF_CASES for d in (torch.float16, torch.bfloat16)]


def _loss_weights(out, lse):
    g = torch.Generator().manual_seed(1)
    return torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)


def _loss(out, lse, go, gl):
    # lse = -inf on empty rows is a constant: leave it out of the loss rather than make it NaN.
    return (out * go.to(out.dtype)).sum() + torch.where(torch.isfinite(lse), lse * gl.to(lse.dtype), 0).sum()


def _triton_grads(args, diff):
    ours = {k: (args[k].detach().clone().requires_grad_(True) if k in diff else v) for k, v in args.items()}
    out, lse = attention.selective_attention(**ours, return_lse=True, backend="triton")
    go, gl = _loss_weights(out, lse)
    loss = _loss(out.float(), lse, go.to(out.device), gl.to(out.device))
    return torch.autograd.grad(loss, [ours[k] for k in diff])


def _oracle_grads(args, diff):
    ref = {k: (args[k].detach().cpu().double().requires_grad_(True) if k in diff else v) for k, v in args.items()}
    r_out, r_lse = oracle(ref)
    go, gl = _loss_weights(r_out, r_lse)
    r_loss = _loss(r_out, r_lse, go.double(), gl.double())
    if not r_loss.requires_grad:  # nothing kept anywhere: the loss is a constant
        return [torch.zeros(args[k].shape, dtype=torch.float64) for k in diff]
    want = torch.autograd.grad(r_loss, [ref[k] for k in diff], allow_unused=True)
    return [torch.zeros(args[k].shape, dtype=torch.float64) if w is None else w for k, w in zip(diff, want)]


def _garbage_rows(x):
    """Rows of a cache that hold NaN: storage no sequence uses (the matrix plants NaN there)."""
    return torch.isnan(x.detach().float().cpu()).any(-1)


@pytest.mark.parametrize("name,dtype", MATRIX, ids=[f"{c}-{DTYPE_NAMES[d]}" for c, d in MATRIX])
def test_gradients_match_float64_autograd(name, dtype):
    args = CASES_BY_NAME[name].make(dtype, DEVICE)
    inp = attention.validate(**args, backend="triton")
    assert attention.registry.choose_backward(inp).name == "triton"
    diff = [k for k in DIFF if k in args]
    got = _triton_grads(args, diff)
    want = _oracle_grads(args, diff)
    tol = GRAD_TOL[dtype]
    for k, a, b in zip(diff, got, want):
        assert a.shape == args[k].shape and a.dtype == args[k].dtype, k
        a = a.detach().cpu().double()
        assert torch.isfinite(a).all(), f"d{k} has non-finite values"
        if k in ("kv", "v", "kv_rope"):
            # Unused pages and rows past the last sequence: exactly zero, never read (they hold NaN).
            garbage = _garbage_rows(args[k])
            assert (a[garbage] == 0).all(), f"d{k}: nonzero gradient in storage no sequence uses"
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert err <= tol * max(1.0, b.abs().max().item() if b.numel() else 0.0), f"d{k}: max error {err:.3g}"


def _direct(args, det, go_gl=None):
    """The launcher called directly (one mode), from the reference's (out, lse)."""
    inp = attention.validate(**args)
    out, lse = attention.selective_attention(**args, return_lse=True, backend="reference")
    go, gl = _loss_weights(out, lse) if go_gl is None else go_gl
    return bwd.backward(inp, out, lse, go.to(out.device), gl.to(out.device), deterministic_mode=det)


# The deterministic path on the interpreter runs one program per cache row: slow, so few cases
# (together: latent and separate V, rope, sink, paged, block selection spanning pages, duplicates).
DET_CASES = ["duplicates", "paged_latent_rope_sink_causal", "rope_separate_v"]


@pytest.mark.parametrize("name", DET_CASES)
def test_deterministic_mode_matches_atomics_and_repeats_bit_identical(name):
    args = CASES_BY_NAME[name].make(torch.float32, DEVICE)
    first = _direct(args, True)
    again = _direct(args, True)
    atomics = _direct(args, False)
    for a, b, c in zip(first, again, atomics):
        if a is None:
            assert b is None and c is None
            continue
        assert same_bits(a, b), "deterministic mode differs between two identical calls"
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_deterministic_mode_is_chosen_by_env_and_by_torch(monkeypatch):
    monkeypatch.delenv(bwd.DETERMINISTIC_ENV, raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    assert not bwd.deterministic()
    monkeypatch.setenv(bwd.DETERMINISTIC_ENV, "1")
    assert bwd.deterministic()
    monkeypatch.delenv(bwd.DETERMINISTIC_ENV)
    try:
        torch.use_deterministic_algorithms(True)
        assert bwd.deterministic()
        # and the op's backward then takes the row-sorted path (the dkv kernel runs)
        launched = []
        kern = bwd_kernels.selective_attention_bwd_dkv_kernel
        monkeypatch.setattr(bwd_kernels, "selective_attention_bwd_dkv_kernel", _Spy(kern, launched))
        args = CASES_BY_NAME["duplicates"].make(torch.float32, DEVICE)
        q = args.pop("q").clone().requires_grad_(True)
        attention.selective_attention(q, **args, backend="triton").sum().backward()
        assert launched
    finally:
        torch.use_deterministic_algorithms(was)


class _Spy:
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def test_grad_lse_only_and_grad_out_only():
    """A loss on out alone or on lse alone (the other gradient is None): both kernels' branches."""
    args = CASES_BY_NAME["sink"].make(torch.float32, DEVICE)
    inp = attention.validate(**args)
    out, lse = attention.selective_attention(**args, return_lse=True, backend="reference")
    go, gl = _loss_weights(out, lse)
    for det, g_out, g_lse in ((False, go, None), (False, None, gl), (True, None, gl)):
        got = bwd.backward(inp, out, lse, g_out, g_lse, deterministic_mode=det)
        want = python_ref.selective_attention_backward(g_out, g_lse, inp.q, inp.kv, inp.indices, out=out, lse=lse,
                                                       **inp.reference_kwargs())
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["rope_separate_v", "paged_latent_rope_sink_causal"])
def test_finite_differences_fp32(name):
    """Directional derivatives of the float32 op against central differences, for every input."""
    args = CASES_BY_NAME[name].make(torch.float32, DEVICE)
    diff = [k for k in DIFF if k in args]
    grads = _triton_grads(args, diff)
    g = torch.Generator().manual_seed(7)
    eps = 1e-2
    for k, gk in zip(diff, grads):
        x = args[k]
        u = torch.randn(x.shape, generator=g).to(x.device)
        u = torch.where(torch.isnan(x), 0.0, u)  # directions inside the used storage only

        def f(sign):
            a = dict(args)
            a[k] = x + sign * eps * u
            out, lse = attention.selective_attention(**a, return_lse=True, backend="triton")
            go, gl = _loss_weights(out, lse)
            return _loss(out.double(), lse.double(), go.double(), gl.double()).item()

        fd = (f(1) - f(-1)) / (2 * eps)
        an = (gk.double() * u.double()).nan_to_num().sum().item()
        assert abs(fd - an) <= 2e-3 * max(1.0, abs(an)), f"d{k}: finite difference {fd:.6g} vs analytic {an:.6g}"


def test_torch_compile_fullgraph_training_step():
    """A training step (forward, loss, backward) compiled with fullgraph=True; the op's backward is the
    Triton kernel, called through the op's registered autograd."""
    args = CASES_BY_NAME["paged_latent_rope_sink_causal"].make(torch.float32, DEVICE)
    q0 = args.pop("q")
    torch._dynamo.reset()

    def step(q, a):
        out, lse = attention.selective_attention(q, **a, return_lse=True, backend="triton")
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    q1 = q0.clone().requires_grad_(True)
    launched = []
    kern = bwd_kernels.selective_attention_bwd_kernel
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bwd_kernels, "selective_attention_bwd_kernel", _Spy(kern, launched))
        compiled(q1, args).backward()
    assert launched, "the compiled step's backward did not run the Triton kernel"
    q2 = q0.clone().requires_grad_(True)
    step(q2, args).backward()
    torch.testing.assert_close(q1.grad, q2.grad)


def test_wide_shapes_decline_the_backward_with_reasons():
    args = CASES_BY_NAME["mqa_latent"].make(torch.float32, DEVICE)
    args["q"] = torch.randn(3, 4, 1100)
    args["kv"] = torch.randn(40, 1, 1100)
    args["d_v"] = 1024
    inp = attention.validate(**args)
    reasons = BACKEND.not_supported_reasons(attention.registry._with_op(inp, "attention_backward"))
    assert any("backward: key tile 1024" in r for r in reasons)
    assert not BACKEND.not_supported_reasons(inp)  # the forward still runs it


def test_work_count_of_the_backward_is_the_plans_dots():
    """bench.work --backward counts what the kernel executes: one token, one tile of 32 candidates,
    16 heads; the eight dots of a latent tile with a tail (scores on the value part and on the tail,
    dP, dV, dq and dK of both parts), each at the plan's padded tile shape."""
    from bench.work import WORK_PRESETS, measure_backward

    row = measure_backward(WORK_PRESETS["tiny"][0], "NVIDIA H200")
    pl = row["plan"]
    bh, bn = pl["BLOCK_H"], pl["BLOCK_N"]
    assert pl["HAS_TAIL"] and row["dots"] == 8 and row["finite"]
    assert row["flops_executed"] == 2 * bh * bn * (3 * pl["BLOCK_DK"] + 3 * pl["BLOCK_DT"] + 2 * pl["BLOCK_DV"])
    assert row["flops_useful"] == 2.5 * 2 * row["kept"] * 16 * (32 + 16)


def test_training_bench_checks_triton_gradients_before_timing():
    from bench.presets import dsv32
    from bench.training import run

    p = dsv32("train-tiny", batch=1, q_per_seq=4, context=32, H=16, Dqk=32, Dv=16, K=8, page_size=8, causal=True)
    rows = run([p], ["reference", "triton"], DEVICE, repeats=1)
    assert [r["status"] for r in rows] == ["checked", "checked"]
    assert max(rows[1]["max_rel_grad_err"].values()) <= 1e-2 and rows[1]["fwd_bwd_ms"] > 0


# ---------------------------------------------------------------- sm_90 compile (no GPU needed)
# (name, dtype, q widths, H, Hkv, Dv, separate v, K, block_size, page_size, deterministic)
COMPILE_PROBLEMS = [
    ("dsv32-prefill-atomics", torch.bfloat16, 576, 128, 1, 512, False, 2048, 1, 64, False),
    ("dsv32-prefill-deterministic", torch.bfloat16, 576, 128, 1, 512, False, 2048, 1, 64, True),
    ("nsa-prefill-atomics", torch.bfloat16, 128, 64, 4, 128, True, 16, 64, 0, False),
]


def _compile_backward():  # runs in a subprocess without TRITON_INTERPRET
    from triton.runtime.jit import JITFunction

    from bench.compile_budget import _resources, compile_launch

    for name, dt, dqk, H, Hkv, dv, sep, K, bs, page, det in COMPILE_PROBLEMS:
        m, T, L = "meta", 256, 4096
        args = dict(q=torch.empty(T, H, dqk, device=m, dtype=dt), block_size=bs, causal=True,
                    indices=torch.empty(T, 1 if Hkv == 1 else Hkv, K, device=m, dtype=torch.int32))
        shape = (L // page, page, Hkv) if page else (L, Hkv)
        args["kv"] = torch.empty(*shape, dqk, device=m, dtype=dt)
        if page:
            args.update(block_table=torch.empty(1, L // page, device=m, dtype=torch.int32),
                        seqlens_k=torch.empty(1, device=m, dtype=torch.int32))
        if sep:
            args["v"] = torch.empty(*shape, dv, device=m, dtype=dt)
        else:
            args["d_v"] = dv
        inp = attention.validate(**args)
        out = torch.empty(T, H, dv, device=m, dtype=dt)
        lse = torch.empty(T, H, device=m, dtype=torch.float32)
        recorded = []
        saved = JITFunction.run
        JITFunction.run = lambda self, *a, grid, warmup, **k: recorded.append((self, a, k))
        try:
            bwd.backward(inp, out, lse, torch.empty_like(out), torch.empty_like(lse), deterministic_mode=det)
        finally:
            JITFunction.run = saved
        for fn, a, k in recorded:
            kernel, _, options = compile_launch(fn, a, k, 90)
            print(json.dumps(dict(problem=name, kernel=fn.__name__, num_warps=options.num_warps,
                                  triton=".".join(triton.__version__.split(".")[:2]),
                                  shared=kernel.metadata.shared, **_resources(kernel.asm["cubin"]))), flush=True)


# The GPU machine's triton 3.6 (``make triton36``: pip --target .triton36), first on the path of the
# compiling subprocess; CI's triton is the venv's own.
TRITON36 = Path(__file__).resolve().parents[1] / ".triton36"


@pytest.mark.parametrize("which", ["ci", "3.6"])
def test_backward_kernels_compile_for_sm90(which):
    """The kernels as the launcher starts them (the JIT's own specialization, bench/compile_budget.py)
    compile for sm_90 within Hopper's shared memory and do not spill, with CI's triton and with the
    GPU machine's 3.6, at the DeepSeek and NSA shapes, in both modes (docs/triton.md "Backward": 3.6
    spilled 8 B in the atomics kernel and 88 B in the dkv kernel until 2026-11-29)."""
    path = [str(Path(__file__).resolve().parents[1])]
    if which == "3.6":
        if not (TRITON36 / "triton").is_dir():
            pytest.skip("no triton 3.6 copy at .triton36 (make triton36)")
        path.insert(0, str(TRITON36))
        ptxas = TRITON36 / "triton" / "backends" / "nvidia" / "bin" / "ptxas"
    else:
        ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    print("\n".join(json.dumps(x) for x in rows))
    version = rows[0]["triton"]
    assert (version == "3.6") == (which == "3.6"), version
    kernels = {(x["problem"], x["kernel"]) for x in rows}
    assert ("dsv32-prefill-deterministic", "selective_attention_bwd_dkv_kernel") in kernels
    assert {x["problem"] for x in rows} == {p[0] for p in COMPILE_PROBLEMS}
    for x in rows:
        assert x["shared"] <= 227 * 1024, x
        assert x["stack"] == 0, x


if __name__ == "__main__":
    _compile_backward()
