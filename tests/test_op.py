"""The torch.library op: schema, fake kernel, opcheck, torch.compile, autograd, and the registry."""

import subprocess
import sys
import warnings

import pytest
import torch

import attention
import python_ref
from attention.registry import ATTENTION_FEATURES
from attention.testing import CASES_BY_NAME, oracle, same_bits

OPCHECK_CASES = ["mqa_latent", "paged_latent_rope_sink_causal", "block_causal_varlen", "gqa_separate_v",
                 "sink_all_dropped", "fp8_paged_latent_rope_sink_causal", "int8_gqa_separate_v_paged"]
QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)


def _split(args):
    a = dict(args)
    return (a.pop("q"), a.pop("kv"), a.pop("indices")), a


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck(name):
    args = CASES_BY_NAME[name].make(torch.float32)
    for k in ("q", "kv", "v", "q_rope", "kv_rope", "attn_sink"):
        if k in args and args[k].dtype not in QUANT_DTYPES:  # a quantized cache is storage, not a parameter
            args[k] = args[k].clone().requires_grad_(True)
    pos, kw = _split(args)
    if any(isinstance(x, torch.Tensor) and x.dtype == torch.float8_e4m3fn for x in args.values()):
        # opcheck's test_schema compares inputs before/after with torch.allclose, which float8 lacks
        # (torch 2.13: "mul_cpu_reduced_float" not implemented): check "no input is mutated" bit for bit
        # here instead, and run opcheck's other checks.
        before = {k: x.detach().clone() for k, x in args.items() if isinstance(x, torch.Tensor)}
        torch.ops.attention.selective_attention.default(*pos, **kw)
        for k, x in before.items():
            assert same_bits(args[k].detach(), x), f"{k} was mutated"
        torch.library.opcheck(torch.ops.attention.selective_attention.default, pos, kw,
                              test_utils=("test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
        return
    torch.library.opcheck(torch.ops.attention.selective_attention.default, pos, kw)


def test_schema_has_every_argument_but_return_lse():
    schema = str(torch.ops.attention.selective_attention.default._schema)
    for name in ("q", "kv", "indices", "v", "d_v", "q_rope", "kv_rope", "sm_scale", "block_size", "cu_seqlens_q",
                 "cu_seqlens_k", "block_table", "seqlens_k", "causal", "attn_sink", "kv_scale", "v_scale",
                 "scale_block", "backend"):
        assert f" {name}" in schema
    assert "return_lse" not in schema
    assert schema.endswith("-> (Tensor, Tensor)")


@pytest.mark.parametrize("name", ["mqa_latent", "paged_latent_rope_sink_causal", "int8_gqa_separate_v_paged",
                                  "fp8_deepseek_split_rope"])
def test_torch_compile_fullgraph(name):
    args = CASES_BY_NAME[name].make(torch.float32)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(args):
        out, lse = attention.selective_attention(**args, return_lse=True)
        return out * 2, lse

    out, lse = step(args)
    ref_out, ref_lse = attention.selective_attention(**args, return_lse=True)
    torch.testing.assert_close(out, ref_out * 2)
    torch.testing.assert_close(lse, ref_lse)


def test_torch_compile_inductor_decode():
    args = CASES_BY_NAME["mqa_latent"].make(torch.float32)
    torch._dynamo.reset()
    f = torch.compile(lambda a: attention.selective_attention(**a) + 1, fullgraph=True)
    torch.testing.assert_close(f(args), attention.selective_attention(**args) + 1)


GRAD_CASES = ["mqa_latent", "gqa_separate_v", "paged_latent_rope_sink_causal", "block_causal_varlen",
              "gqa_shared_indices", "duplicates", "sink_all_dropped", "k_zero", "strided_inputs"]


@pytest.mark.parametrize("name", GRAD_CASES)
def test_backward_matches_float64_autograd(name):
    """Gradients of the op (analytical backward) vs autograd through the float64 oracle."""
    args = CASES_BY_NAME[name].make(torch.float32)
    diff = [k for k in ("q", "kv", "v", "q_rope", "kv_rope", "attn_sink") if k in args]
    ours = {k: (args[k].detach().clone().requires_grad_(True) if k in diff else v) for k, v in args.items()}
    out, lse = attention.selective_attention(**ours, return_lse=True)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(out.shape, generator=g)
    gl = torch.randn(lse.shape, generator=g)
    loss = (out * go).sum() + torch.where(torch.isfinite(lse), lse * gl, 0).sum()
    got = torch.autograd.grad(loss, [ours[k] for k in diff])

    ref_args = {k: (args[k].detach().double().requires_grad_(True) if k in diff else v) for k, v in args.items()}
    r_out, r_lse = oracle(ref_args)
    r_loss = (r_out * go.double()).sum() + torch.where(torch.isfinite(r_lse), r_lse * gl.double(), 0).sum()
    if r_loss.requires_grad:
        want = torch.autograd.grad(r_loss, [ref_args[k] for k in diff], allow_unused=True)
    else:  # nothing is kept anywhere: the loss is a constant
        want = [None] * len(diff)
    for k, a, b in zip(diff, got, want):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        # NaN-filled garbage rows of the cache receive exactly zero gradient.
        b = torch.nan_to_num(b, nan=0.0)
        assert torch.isfinite(a).all(), f"d{k} has non-finite values"
        err = (a.double() - b).abs().max().item()
        assert err <= 2e-4, f"d{k}: max error {err}"


def test_backward_through_torch_ops_and_gradcheck_style_finite_difference():
    args = CASES_BY_NAME["rope_latent"].make(torch.float32)
    q = args["q"].clone().requires_grad_(True)
    out, _ = torch.ops.attention.selective_attention(q, args["kv"], args["indices"], d_v=args["d_v"],
                                                    q_rope=args["q_rope"], kv_rope=args["kv_rope"])
    (gq,) = torch.autograd.grad(out.sum(), [q])
    eps = 1e-3
    qp = q.detach().clone()
    qp[0, 0, 0] += eps
    qm = q.detach().clone()
    qm[0, 0, 0] -= eps
    f = lambda x: attention.selective_attention(x, args["kv"], args["indices"], d_v=args["d_v"],  # noqa: E731
                                                q_rope=args["q_rope"], kv_rope=args["kv_rope"]).double().sum()
    fd = (f(qp) - f(qm)) / (2 * eps)
    assert abs(fd.item() - gq[0, 0, 0].item()) < 1e-2


def test_automatic_choice_on_cpu_is_reference():
    args = CASES_BY_NAME["mqa_latent"].make(torch.float32)
    inp = attention.validate(**args)
    assert attention.choose_backend(inp).name == "reference"


def test_no_backend_error_lists_every_backend():
    inp = attention.validate(**CASES_BY_NAME["mqa_latent"].make(torch.float32, "meta"), check_contents=False)
    saved = attention.get_backend("reference")
    attention.unregister_backend("reference")
    try:
        with pytest.raises(ValueError) as e:
            attention.choose_backend(inp)
    finally:
        attention.register_backend(saved)
    for b in attention.backends():
        if b.name != "reference":
            assert b.name in str(e.value)


def test_declining_preferred_backend_warns_once_and_falls_back():
    class PreferredButPicky(attention.Backend):
        name = "preferred_test_only"
        priorities = {"cpu": -10}
        ops = {"attention": ATTENTION_FEATURES}
        dtypes = frozenset({torch.float16})

        def forward(self, inp):  # pragma: no cover
            raise AssertionError

    attention.register_backend(PreferredButPicky())
    try:
        args = CASES_BY_NAME["mqa_latent"].make(torch.float32)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            attention.selective_attention(**args)
            attention.selective_attention(**args)
        msgs = [str(x.message) for x in w if "preferred_test_only" in str(x.message)]
        assert len(msgs) == 1 and "dtype float32 not supported" in msgs[0]
    finally:
        attention.unregister_backend("preferred_test_only")


def test_info_prints_every_backend():
    r = subprocess.run([sys.executable, "-m", "attention.info"], capture_output=True, text=True, check=True)
    for b in attention.backends():
        assert b.name in r.stdout


def test_reference_chunking_gives_same_result():
    """Tiny chunk budget (one token per chunk) gives the same numbers as one chunk."""
    args = CASES_BY_NAME["paged_latent_rope_sink_causal"].make(torch.float32)
    a = dict(args)
    q, kv, idx = a.pop("q"), a.pop("kv"), a.pop("indices")
    o1, l1 = python_ref.selective_attention(q, kv, idx, **a)
    o2, l2 = python_ref.selective_attention(q, kv, idx, **a, chunk_bytes=1)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)


def test_empty_rows_are_zero_not_nan():
    args = CASES_BY_NAME["all_dropped"].make(torch.float32)
    out, lse = attention.selective_attention(**args, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_zero_query_tokens():
    out, lse = attention.selective_attention(torch.randn(0, 4, 8), torch.randn(5, 1, 8),
                                             torch.zeros(0, 1, 3, dtype=torch.int32), return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)


# ---------------------------------------------------------------- architecture: one argument table, one registry
def test_argument_table_is_the_one_declaration():
    """Schema, dataclass, validator, public signature and reference keywords all follow attention.arguments."""
    import inspect

    from attention import arguments

    schema = torch.ops.attention.selective_attention.default._schema
    assert [a.name for a in schema.arguments] == list(arguments.ARG_NAMES)
    assert [str(a.default_value) if a.has_default_value() else None for a in schema.arguments][3:] == \
        [str(d) for d in arguments.DEFAULTS]
    fields = [f.name for f in __import__("dataclasses").fields(attention.SelectiveAttentionInputs)]
    assert fields == list(arguments.ARG_NAMES)
    assert list(inspect.signature(attention.validate).parameters) == list(arguments.ARG_NAMES) + ["check_contents"]
    api = [n for n in inspect.signature(attention.selective_attention).parameters if n != "return_lse"]
    assert api == list(arguments.ARG_NAMES)
    ref = inspect.signature(python_ref.selective_attention).parameters
    assert all(n in ref for n in arguments.REFERENCE_KWARGS)
    assert set(arguments.DIFFERENTIABLE) == {"q", "kv", "v", "q_rope", "kv_rope", "attn_sink"}


def test_validate_binds_positional_and_keyword_arguments_alike():
    args = CASES_BY_NAME["paged_latent_rope_sink_causal"].make(torch.float32)
    from attention.arguments import ARG_NAMES

    by_kw = attention.validate(**args)
    by_pos = attention.validate(*[args.get(n, d) for n, d in zip(ARG_NAMES, (None,) * 3 + _defaults())])
    for n in ARG_NAMES:
        a, b = getattr(by_kw, n), getattr(by_pos, n)
        assert (a is b) or (isinstance(a, torch.Tensor) and torch.equal(a, b)) or a == b, n
    with pytest.raises(TypeError, match="unexpected keyword argument 'k_scale'"):
        attention.validate(**args, k_scale=1.0)


def _defaults():
    from attention.arguments import DEFAULTS

    return DEFAULTS


def _register(backend):
    attention.register_backend(backend)
    return backend


def test_capabilities_are_opt_in():
    """A backend has only what it declares: no ops by default, and only the listed features of an op."""
    class Bare(attention.Backend):
        name = "bare_test_only"
        priorities = {"cpu": -100}

        def forward(self, inp):  # pragma: no cover
            raise AssertionError("a backend that declares nothing must never run")

    class NoPaged(attention.Backend):
        name = "no_paged_test_only"
        priorities = {"cpu": -100}
        ops = {"attention": ATTENTION_FEATURES - {"paged"}}
        dtypes = frozenset({torch.float32})
        calls = 0

        def forward(self, inp):
            NoPaged.calls += 1
            return attention.get_backend("reference").forward(inp)

    contiguous = CASES_BY_NAME["mqa_latent"].make(torch.float32)
    paged = CASES_BY_NAME["paged_latent_rope_sink_causal"].make(torch.float32)
    _register(Bare())
    try:
        reasons = Bare().not_supported_reasons(attention.validate(**contiguous))
        assert any("op attention not implemented" in r for r in reasons)
        attention.selective_attention(**contiguous)  # the reference runs it; Bare is never a candidate
        _register(NoPaged())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attention.selective_attention(**contiguous)
            assert NoPaged.calls == 1
            assert "features not supported: paged" in "; ".join(NoPaged().not_supported_reasons(
                attention.validate(**paged)))
            attention.selective_attention(**paged)
            assert NoPaged.calls == 1
    finally:
        attention.unregister_backend("bare_test_only")
        attention.unregister_backend("no_paged_test_only")


def test_choice_cache_keys_on_features_and_sizes_not_the_cache_length():
    """A decode step that grows the kv cache reuses the cached choice (same features and sizes)."""
    from attention import registry

    registry._choice_cache.clear()
    q = torch.randn(1, 4, 16)
    idx = torch.zeros(1, 1, 8, dtype=torch.int32)
    for S in (32, 33, 34):
        attention.selective_attention(q, torch.randn(S, 1, 16), idx)
    assert len(registry._choice_cache) == 1
    attention.selective_attention(q, torch.randn(2, 8, 1, 16), idx, block_table=torch.tensor([[0, 1]]),
                                  seqlens_k=torch.tensor([16]))
    assert len(registry._choice_cache) == 2  # paged is another feature set


def test_backward_slot_is_chosen_by_the_registry_and_gets_the_saved_lse():
    """A backend declaring attention_backward differentiates the op; it receives the forward's out and lse."""
    seen = {}

    class BackwardOnly(attention.Backend):
        name = "backward_test_only"
        priorities = {"cpu": -100}
        ops = {"attention_backward": ATTENTION_FEATURES}
        dtypes = frozenset({torch.float32})

        def backward(self, inp, out, lse, grad_out, grad_lse):
            seen["out"], seen["lse"] = out, lse
            return super().backward(inp, out, lse, grad_out, grad_lse)  # the reference's analytical one

    args = CASES_BY_NAME["paged_latent_rope_sink_causal"].make(torch.float32)
    q = args.pop("q").clone().requires_grad_(True)
    _register(BackwardOnly())
    try:
        out, lse = attention.selective_attention(q, **args, return_lse=True)
        (gq,) = torch.autograd.grad((out * out).sum() + torch.where(torch.isfinite(lse), lse, 0).sum(), [q])
    finally:
        attention.unregister_backend("backward_test_only")
    assert torch.equal(seen["out"], out.detach()) and torch.equal(seen["lse"], lse.detach())
    (want,) = torch.autograd.grad(*_loss_and_q(args, q))
    torch.testing.assert_close(gq, want)


def _loss_and_q(args, q):
    q2 = q.detach().clone().requires_grad_(True)
    out, lse = attention.selective_attention(q2, **args, return_lse=True)
    return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0).sum(), [q2]


@pytest.mark.parametrize("name", ["paged_latent_rope_sink_causal", "sink_all_dropped", "gqa_separate_v"])
def test_reference_backward_from_saved_out_and_lse_equals_recomputed(name):
    args = CASES_BY_NAME[name].make(torch.float32)
    q, kv, idx = args.pop("q"), args.pop("kv"), args.pop("indices")
    args.pop("backend", None)
    out, lse = python_ref.selective_attention(q, kv, idx, **args)
    g = torch.Generator().manual_seed(3)
    go, gl = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    fresh = python_ref.selective_attention_backward(go, gl, q, kv, idx, **args)
    saved = python_ref.selective_attention_backward(go, gl, q, kv, idx, **args, out=out, lse=lse)
    for a, b in zip(fresh, saved):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
