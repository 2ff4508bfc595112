"""Triton backend beyond the equivalence matrix: the split-K path, launch plans with several head and
value blocks, indices far outside the cache, sync-free host code, and registration.

Runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py), or on a GPU when there is one.
"""

import math

import pytest
import torch

import attention
from attention.testing import CASES_BY_NAME, DTYPE_NAMES, TOLERANCES, oracle
from attention.testing import max_error as _max_err

triton = pytest.importorskip("triton")

from attention.backends.triton import BACKEND, launch  # noqa: E402
from attention.backends.triton.kernels import _to_out  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not BACKEND.test_devices(), reason="triton backend cannot run here")


def _check(case_name, dtype, override=None, args=None):
    case = CASES_BY_NAME[case_name]
    args = args or case.make(dtype, DEVICE)
    inp = attention.validate(**args)
    out, lse = launch.forward(inp, override=override, autotune=False)
    ref_out, ref_lse = oracle(args)
    tol_out, tol_lse = TOLERANCES[dtype]
    eo, el = _max_err(out, ref_out), _max_err(lse, ref_lse)
    assert eo <= tol_out and el <= tol_lse, f"{case_name}/{DTYPE_NAMES[dtype]} {override}: out {eo:.3g} lse {el:.3g}"
    return inp


SPLIT_CASES = ["mqa_latent", "gqa_separate_v", "rope_latent", "causal", "block4_causal", "block_causal_varlen",
               "varlen_empty_sequence", "paged_latent_rope_sink_causal", "paged_block_spans_pages", "sink",
               "sink_all_dropped", "all_dropped", "duplicates", "k_large_odd", "deepseek_split_rope",
               "negative_scale", "single_token"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("case_name", SPLIT_CASES)
def test_split_k_matches_oracle(case_name, dtype):
    """Flash-decoding: candidates split over 3 programs per (token, head block), combined by LSE."""
    inp = _check(case_name, dtype, override=dict(num_splits=3, BLOCK_N=16))
    n = inp.topk * inp.block_size
    p = launch.plan(inp, dict(launch.resolve_config(inp)[0], num_splits=3, BLOCK_N=16))
    assert p["num_splits"] == max(1, min(3, math.ceil(n / 16))) or n <= 16


def test_split_k_is_really_split():
    inp = attention.validate(**CASES_BY_NAME["k_large_odd"].make(torch.float32, DEVICE))
    p = launch.plan(inp, dict(launch.resolve_config(inp)[0], num_splits=3, BLOCK_N=16))
    assert p["num_splits"] == 3 and p["cand_per_split"] * 3 >= 77


def test_automatic_split_for_few_queries_over_many_candidates():
    """The plan alone (no data) decides split-K: few programs, many candidates -> several splits."""
    inp = attention.validate(**CASES_BY_NAME["k_large_odd"].make(torch.float32, DEVICE))
    p = launch.plan(inp, dict(launch.tuning.FALLBACK_CONFIG, target_programs=64, min_per_split=16, BLOCK_N=16))
    assert p["num_splits"] > 1
    p = launch.plan(inp, dict(launch.tuning.FALLBACK_CONFIG, target_programs=1, min_per_split=16))
    assert p["num_splits"] == 1


@pytest.mark.parametrize("override", [
    dict(BLOCK_H=16, BLOCK_DV=16, BLOCK_D=32, BLOCK_N=16),  # several head and value blocks, 576 in 18 chunks
    dict(BLOCK_H=16, BLOCK_DV=128, BLOCK_D=64, BLOCK_N=64, num_splits=2),
], ids=["small_blocks", "split_wide"])
@pytest.mark.parametrize("case_name", ["mha_many_heads", "deepseek_widths", "odd_widths", "paged_separate_v_gqa"])
def test_launch_plans(case_name, override):
    _check(case_name, torch.float32, override=override)


# Quantized caches through the paths the matrix's default plan does not take: the general
# kernel in latent mode (V = KV, dequantized with kv's scales), several value blocks (the second one
# starting inside a scale tile's row), 16-column key chunks (one scale per chunk), the row gather of
# the Ascend plan, and split-K. The scale blocks of these cases (8, 12, 16) cover each way
# _dequantize loads scales: one per chunk, a [rows, tiles] load, one per column.
@pytest.mark.parametrize("override", [
    dict(LATENT=0, BLOCK_D=16, BLOCK_DV=16, BLOCK_N=16),
    dict(LATENT=0, GATHER_ROWS=1, BLOCK_D=64, BLOCK_N=32),
    dict(num_splits=3, BLOCK_N=16),
], ids=["general_small_blocks", "general_gather_rows", "split"])
@pytest.mark.parametrize("case_name", ["fp8_paged_latent_rope_sink_causal", "int8_block_causal_varlen", "fp8_varlen",
                                       "int8_gqa_separate_v_paged"])
def test_quantized_cache_launch_plans(case_name, override):
    inp = _check(case_name, torch.float32, override=override)
    assert inp.kv_scale is not None
    kernel = launch.plan(inp, launch.resolve_config(inp, override)[0])["kernel"]
    assert kernel == ("latent" if override.get("LATENT", 1) and inp.v is None else "general")


def test_many_heads_per_kv_head_use_several_head_blocks():
    case = CASES_BY_NAME["mqa_latent"]
    from dataclasses import replace

    big = replace(case, name="mqa_40_heads", H=40, K=20)
    args = big.make(torch.float16, DEVICE)
    inp = attention.validate(**args)
    p = launch.plan(inp, dict(launch.resolve_config(inp)[0], BLOCK_H=16))
    assert p["NUM_HB"] == 3
    out, lse = launch.forward(inp, override=dict(BLOCK_H=16), autotune=False)
    ref_out, ref_lse = oracle(args)
    assert _max_err(out, ref_out) <= TOLERANCES[torch.float16][0]
    assert _max_err(lse, ref_lse) <= TOLERANCES[torch.float16][1]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("paged", [False, True])
def test_far_out_of_range_indices_are_never_loaded(index_dtype, paged):
    """Indices of 2**30 (and 2**40 for int64) and table entries far outside the cache: a kernel that
    loaded them would fault (GPU) or raise (interpreter); the answer must match the oracle."""
    from dataclasses import replace

    case = replace(CASES_BY_NAME["paged" if paged else "mqa_latent"], name="far", index_mode="valid",
                   index_dtype=index_dtype)
    args = case.make(torch.float32, DEVICE)
    idx = args["indices"].clone()
    huge = 2**40 if index_dtype == torch.int64 else 2**30
    idx[:, :, ::3] = huge
    idx[:, :, 1::5] = -huge
    args["indices"] = idx
    if paged:
        bt = args["block_table"].clone()
        bt[:, -1] = 2**30  # the padding column: beyond seqlens_k, never needed
        args["block_table"] = bt
    inp = attention.validate(**args)
    out, lse = launch.forward(inp, autotune=False)
    ref_out, ref_lse = oracle(args)
    assert _max_err(out, ref_out) <= 1e-4 and _max_err(lse, ref_lse) <= 1e-4


def test_host_path_reads_no_device_data(monkeypatch):
    """No .item()/.tolist()/.cpu()/bool(tensor) between validation and the launches: what a CUDA
    graph capture and set_sync_debug_mode('error') need. The kernels are replaced by recorders."""
    from dataclasses import replace

    case = replace(CASES_BY_NAME["paged_latent_rope_sink_causal"], name="sync_free", K=40)
    inp = attention.validate(**case.make(torch.float32, DEVICE))
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def run(*a, **k):
                launches.append(grid)
            return run

    monkeypatch.setattr(launch, "selective_attention_fwd_kernel", Recorder())
    monkeypatch.setattr(launch, "selective_attention_latent_kernel", Recorder())
    monkeypatch.setattr(launch, "selective_attention_combine_kernel", Recorder())

    def forbidden(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called in the launch path")
        return f

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    launch.forward(inp, override=dict(num_splits=2, BLOCK_N=16), autotune=False)
    assert len(launches) == 2  # split kernel + combine


def test_registration_and_priorities():
    assert attention.get_backend("triton") is BACKEND
    assert BACKEND.priority_for("cuda") < attention.get_backend("reference").priority_for("cuda")
    assert BACKEND.priority_for("cpu") > attention.get_backend("reference").priority_for("cpu")
    if DEVICE == "cpu":
        assert BACKEND.test_devices() == ["cpu"]
        # CPU users get the reference automatically; the interpreter is for tests only.
        inp = attention.validate(**CASES_BY_NAME["mqa_latent"].make(torch.float32, "cpu"))
        assert attention.choose_backend(inp).name == "reference"


def test_grid_limit_is_a_declared_reason(monkeypatch):
    from attention.backends.triton import limits

    inp = attention.validate(**CASES_BY_NAME["mha_many_heads"].make(torch.float32, DEVICE))
    assert BACKEND.not_supported_reasons(inp) == []
    monkeypatch.setattr(limits, "MAX_GRID_Y", 4)
    reasons = BACKEND.not_supported_reasons(inp)
    assert reasons and "grid axis 1" in reasons[0]
    with pytest.raises(ValueError, match="grid axis 1"):
        attention.selective_attention(**CASES_BY_NAME["mha_many_heads"].make(torch.float32, DEVICE), backend="triton")


def test_empty_query_batch():
    args = CASES_BY_NAME["mqa_latent"].make(torch.float32, DEVICE)
    args["q"] = args["q"][:0]
    args["indices"] = args["indices"][:0]
    out, lse = attention.selective_attention(**args, backend="triton", return_lse=True)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4)


@triton.jit
def _cast_rtne(X, Y, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(Y + r, _to_out(tl.load(X + r), Y, True))


def test_interpreter_rounds_bfloat16_to_nearest_even():
    """The kernels' float32 -> bfloat16 conversion rounds like a GPU (the interpreter's
    own .to(tl.bfloat16) truncates): bit-equal to torch's conversion, ties, inf, NaN and the top of
    the range included."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=g) * torch.logspace(-40, 38, 4096).float()
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x7F7FFFFF, 0x00008000, 0x80018000], dtype=torch.int64)
    x[:6] = bits.to(torch.uint32).view(torch.float32)  # exact ties (even and odd), a non-tie, max float, subnormal ties
    x[6:9] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    y = torch.empty(4096, dtype=torch.bfloat16)
    _cast_rtne[(1,)](x, y, N=4096)
    want = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(y) & torch.isnan(want))
    assert bool(same.all()), f"{int((~same).sum())} of 4096 differ"


def test_bfloat16_output_meets_flash_mla_cosine_rule():
    """FlashMLA's test rule for bf16 outputs: 1 - 2 sum(x y) / (sum x^2 + sum y^2) < 5e-6 against the
    float64 result. With the interpreter's truncation the bias fails it."""
    case = CASES_BY_NAME["deepseek_widths"]
    args = case.make(torch.bfloat16, DEVICE)
    out, _ = launch.forward(attention.validate(**args), autotune=False)
    ref, _ = oracle(args)
    x, y = out.double().cpu().flatten(), ref.flatten()
    cos_diff = 1 - 2 * (x * y).sum() / (x * x + y * y).sum()
    assert float(cos_diff) < 5e-6, float(cos_diff)
