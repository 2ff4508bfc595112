"""Quantized kv caches (docs/contract.md "Quantized caches"): the quantizer, the reference's dequantize-after-gather, gradients,
registry features. The equivalence matrix (tests/test_equivalence.py) runs the quantized cases of
attention.testing against the float64 oracle on every backend that declares kv_fp8 / kv_int8."""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attention
import python_ref
from attention import registry
from attention.registry import ATTENTION_FEATURES, KV_QUANT_FEATURES
from attention.testing import CASES, CASES_BY_NAME, oracle

FP8, INT8 = torch.float8_e4m3fn, torch.int8


# ---------------------------------------------------------------- quantize_kv
@pytest.mark.parametrize("dtype", [FP8, INT8])
@pytest.mark.parametrize("scale_block", [128, 16, 24])
def test_quantize_kv_error_is_within_half_a_step(dtype, scale_block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 80, generator=g) * torch.logspace(-3, 3, 7)[:, None, None]
    kv_q, scale = attention.quantize_kv(x, dtype, scale_block)
    n = -(-80 // scale_block)
    assert kv_q.dtype == dtype and kv_q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (7, 3, n)
    tile_of = torch.arange(80) // scale_block
    s = scale[..., tile_of]  # [7, 3, 80] the scale of each column
    back = kv_q.to(torch.float64) * s.double()
    err = (back - x.double()).abs()
    if dtype == INT8:
        bound = 0.5 * s.double()  # round to nearest on a grid of step `scale`
    else:
        # e4m3: 3 mantissa bits -> half a step is 2^-4 relative for normal values (|y| >= 2^-6),
        # and 2^-10 absolute (in units of the scale) among the subnormals.
        bound = torch.maximum(x.double().abs() * 2.0 ** -4, 2.0 ** -10 * s.double())
    assert bool((err <= bound * (1 + 1e-6) + 1e-30).all())
    # amax scaling: each tile's largest magnitude lands on the largest stored value
    qmax = python_ref.QUANT_MAX[dtype]
    tiles_max = kv_q.to(torch.float32).abs()
    per_tile = torch.zeros(7, 3, n).scatter_reduce_(-1, tile_of.expand(7, 3, 80), tiles_max, "amax")
    assert torch.equal(per_tile, torch.full_like(per_tile, qmax))


def test_quantize_kv_rounds_ties_to_even_and_zero_tiles_get_scale_one():
    # int8: tile amax 127 -> scale 1, so 2.5 and 3.5 are exact ties: 2 and 4 (to even), -2.5 -> -2
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5], [0.0, 0.0, 0.0, 0.0]])
    q, s = attention.quantize_kv(x, INT8, 4)
    assert q.tolist() == [[127, 2, 4, -2], [0, 0, 0, 0]]
    assert s.tolist() == [[1.0], [1.0]]
    # e4m3: amax 448 -> scale 1; in [16, 32) the step is 2: 17 -> 16 and 19 -> 20 (even mantissas)
    x = torch.tensor([[448.0, 17.0, 19.0, -17.0]])
    q, s = attention.quantize_kv(x, FP8, 4)
    assert q.to(torch.float32).tolist() == [[448.0, 16.0, 20.0, -16.0]]


@pytest.mark.parametrize("dtype", [FP8, INT8])
def test_quantize_kv_saturates_and_a_non_finite_tile_dequantizes_to_nan(dtype):
    qmax = python_ref.QUANT_MAX[dtype]
    x = torch.tensor([[1.0, float("nan"), 2.0, 3.0], [5.0, -5.0, 1.0, 0.5]])
    q, s = attention.quantize_kv(x, dtype, 2)
    back = python_ref.dequantize(q, s, 2, torch.float64)
    assert torch.isnan(back[0, :2]).all() and torch.isfinite(back[0, 2:]).all()
    assert q[1, :2].to(torch.float32).tolist() == [qmax, -qmax]  # the amax itself, both signs, saturated


@pytest.mark.parametrize("bad,exc,words", [
    (dict(kv=torch.ones(4, 2, dtype=torch.int32)), TypeError, ["kv", "int32"]),
    (dict(dtype=torch.float8_e5m2), TypeError, ["dtype", "float8_e5m2"]),
    (dict(dtype=torch.float16), TypeError, ["dtype"]),
    (dict(scale_block=0), ValueError, ["scale_block", ">= 1"]),
    (dict(scale_block=2.0), TypeError, ["scale_block"]),
    (dict(kv=[1.0]), TypeError, ["kv", "torch.Tensor"]),
])
def test_quantize_kv_bad_arguments(bad, exc, words):
    args = dict(kv=torch.ones(4, 2), dtype=INT8, scale_block=2)
    args.update(bad)
    with pytest.raises(exc) as e:
        attention.quantize_kv(args["kv"], args["dtype"], args["scale_block"])
    for w in words:
        assert w in str(e.value)


# ---------------------------------------------------------------- the op on a quantized cache
@pytest.mark.parametrize("name", [c.name for c in CASES if c.kv_quant])
def test_quantized_cache_equals_the_float_call_on_its_dequantized_values(name):
    """The contract's definition, read from the other side: the op on (kv_q, kv_scale) is the op on
    the dequantized float32 cache (NaN garbage rows dequantize to NaN and are never read either way)."""
    args = CASES_BY_NAME[name].make(torch.float32)
    sb = args["scale_block"]
    plain = {k: x for k, x in args.items() if k not in ("kv_scale", "v_scale", "scale_block")}
    plain["kv"] = python_ref.dequantize(args["kv"], args["kv_scale"], sb)
    if "v_scale" in args:
        plain["v"] = python_ref.dequantize(args["v"], args["v_scale"], sb)
    out, lse = attention.selective_attention(**args, return_lse=True)
    want_out, want_lse = attention.selective_attention(**plain, return_lse=True)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5, equal_nan=True)


class _LargestFloatResult(TorchDispatchMode):
    """Records the element count of the largest floating-point tensor any aten op allocates (views of
    an op's inputs, such as the reshaped kv_scale, allocate nothing and are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(x, torch.Tensor)}
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and \
                    x.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("dtype", [FP8, INT8])
@pytest.mark.parametrize("path", ["decode_gather", "prefill_union"])
def test_reference_dequantizes_only_the_selected_rows(dtype, path):
    """Memory bounded by the selected rows: no float tensor the size of the cache is ever made (the
    cache is 50x larger than everything the call selects), on the gather path and the chunk-union
    fast path (prefill tokens that select mostly the same rows)."""
    S, Hkv, D, H, K = 20000, 1, 64, 4, 16
    g = torch.Generator().manual_seed(0)
    kv_q, kv_scale = attention.quantize_kv(torch.randn(S, Hkv, D, generator=g), dtype, 32)
    T = 1 if path == "decode_gather" else 8
    base = torch.randint(0, S, (1, 1, K), generator=g)
    idx = (base.expand(T, 1, K) if path == "prefill_union" else base).to(torch.int32).contiguous()
    q = torch.randn(T, H, D, generator=g)
    with _LargestFloatResult() as mode:
        out, _ = python_ref.selective_attention(q, kv_q, idx, kv_scale=kv_scale, scale_block=32)
    assert mode.largest <= T * H * K * D, f"a float tensor of {mode.largest} elements (cache: {S * Hkv * D})"
    ref, _ = oracle(dict(q=q, kv=kv_q, indices=idx, kv_scale=kv_scale, scale_block=32))
    assert (out.double() - ref).abs().max() < 1e-4


def test_union_path_is_the_one_taken_for_a_shared_prefill_selection():
    """(The prefill_union case above exercises _chunk_union: it is chosen for these shapes.)"""
    sa = sys.modules["python_ref.selective_attention"]  # the module (the package exports the function)

    S, D, K, T = 20000, 64, 16, 8
    kv_q, kv_scale = attention.quantize_kv(torch.randn(S, 1, D), INT8, 32)
    idx = torch.randint(0, S, (1, 1, K)).expand(T, 1, K).to(torch.int32)
    q = torch.randn(T, 4, D)
    call = sa._Call(q, kv_q, idx, None, None, None, None, None, 1, None, None, None, None, False, None, 0, None,
                    kv_scale, None, 32)
    selected = sa._select(call, idx, 0, T)
    assert sa._union_rows(call, *selected, 1 << 28, 1) is not None


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["fp8_paged_latent_rope_sink_causal", "int8_gqa_separate_v_paged",
                                  "int8_strided_rope_separate_v"])
def test_backward_flows_to_q_rope_and_sink_not_to_the_quantized_cache(name):
    args = CASES_BY_NAME[name].make(torch.float32)
    diff = [k for k in ("q", "q_rope", "kv_rope", "attn_sink") if k in args]
    ours = {k: (x.detach().clone().requires_grad_(True) if k in diff else x) for k, x in args.items()}
    out, lse = attention.selective_attention(**ours, return_lse=True)
    g = torch.Generator().manual_seed(1)
    go, gl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    loss = (out * go).sum() + torch.where(torch.isfinite(lse), lse * gl, 0).sum()
    got = torch.autograd.grad(loss, [ours[k] for k in diff])

    ref_args = {k: (x.detach().double().requires_grad_(True) if k in diff else x) for k, x in args.items()}
    r_out, r_lse = oracle(ref_args)
    r_loss = (r_out * go.double()).sum() + torch.where(torch.isfinite(r_lse), r_lse * gl.double(), 0).sum()
    want = torch.autograd.grad(r_loss, [ref_args[k] for k in diff], allow_unused=True)
    for k, a, b in zip(diff, got, want):
        b = torch.nan_to_num(torch.zeros_like(a, dtype=torch.float64) if b is None else b, nan=0.0)
        assert torch.isfinite(a).all(), f"d{k} has non-finite values"
        assert (a.double() - b).abs().max().item() <= 2e-4, k

    # the reference backward itself: None for the quantized kv (and v), gradients for the rest
    a = dict(args)
    q, kv, idx = a.pop("q"), a.pop("kv"), a.pop("indices")
    grads = python_ref.selective_attention_backward(go, gl, q, kv, idx, **a)
    assert grads[1] is None
    assert grads[2] is None  # no v, or a quantized one
    assert grads[0] is not None and grads[0].shape == q.shape


# ---------------------------------------------------------------- registry features
@pytest.mark.parametrize("kv_dtype,v_dtype,want", [
    (FP8, None, {"kv_fp8"}), (INT8, None, {"kv_int8"}), (torch.float32, INT8, {"kv_int8"}),
    (FP8, INT8, {"kv_fp8", "kv_int8"}), (torch.float32, None, set()),
])
def test_features_name_the_quantized_storage(kv_dtype, v_dtype, want):
    S, D = 10, 16
    kv = torch.randn(S, 1, D)
    args = dict(q=torch.randn(2, 2, D), indices=torch.zeros(2, 1, 3, dtype=torch.int32))
    if kv_dtype is torch.float32:
        args["kv"] = kv
    else:
        args["kv"], args["kv_scale"] = attention.quantize_kv(kv, kv_dtype)
    if v_dtype is not None:
        args["v"], args["v_scale"] = attention.quantize_kv(torch.randn(S, 1, 8), v_dtype)
    inp = attention.validate(**args)
    assert inp.features & KV_QUANT_FEATURES == want
    assert attention.choose_backend(inp).name == "reference"
    if want:
        assert any(w in inp.describe() for w in ("int8", "float8_e4m3fn"))


def test_quantized_caches_are_opt_in():
    """A backend that does not declare kv_fp8 / kv_int8 is never given a quantized cache."""
    class FloatOnly(attention.Backend):
        name = "float_only_test_only"
        priorities = {"cpu": -100}
        ops = {"attention": ATTENTION_FEATURES - KV_QUANT_FEATURES}
        dtypes = frozenset({torch.float32})
        calls = 0

        def forward(self, inp):
            FloatOnly.calls += 1
            return attention.get_backend("reference").forward(inp)

    args = CASES_BY_NAME["int8_gqa_separate_v_paged"].make(torch.float32)
    attention.register_backend(FloatOnly())
    try:
        reasons = FloatOnly().not_supported_reasons(attention.validate(**args))
        assert "features not supported: kv_int8" in "; ".join(reasons)
        with pytest.warns(RuntimeWarning, match="kv_int8"):
            attention.selective_attention(**args)
        assert FloatOnly.calls == 0
    finally:
        attention.unregister_backend("float_only_test_only")
    inp = attention.validate(**args)
    for backend in registry.backends("attention"):  # whoever does not declare kv_int8 must decline it
        if "attention" in backend.ops and "kv_int8" not in backend.ops["attention"]:
            assert "kv_int8" in "; ".join(backend.not_supported_reasons(inp)), backend.name


def test_fp8_table_conversion_is_the_float8_conversion_bit_for_bit():
    """python_ref.stored_values reads float8 through a 256-entry table on the CPU (faster than PyTorch's
    element-wise conversion): every one of the 256 codes, NaN included, gives the same bits as ``.to``,
    contiguous or a strided view, and across the table's slices (each slice starts where the last ended)."""
    from python_ref import quantize
    from python_ref.quantize import stored_values

    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
    reps = -(-quantize.FP8_TABLE_MIN // 256)
    tiled = every.repeat(reps)  # read through the table (small tensors take .to)
    strided = every.repeat(reps, 1).t()  # the same, a non-contiguous view
    n = quantize.FP8_TABLE_SLICE + 300  # two slices, the second partial, every code in both
    long = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(FP8)
    for codes in (every, tiled, strided, long):
        for dt, ints in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float64, torch.int64)):
            got, want = stored_values(codes, dt), codes.to(dt)
            assert got.shape == want.shape and got.dtype == dt
            assert torch.equal(got.view(ints), want.view(ints))
