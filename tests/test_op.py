"""The torch.library op: schema, fake kernel, opcheck, torch.compile, autograd, and the registry."""

import subprocess
import sys
import warnings

import pytest
import torch

import attention
import python_ref
from attention.registry import ATTENTION_FEATURES
from attention.testing import CASES_BY_NAME, oracle

OPCHECK_CASES = ["mqa_latent", "paged_latent_rope_sink_causal", "block_causal_varlen", "gqa_separate_v",
                 "sink_all_dropped"]


def _split(args):
    a = dict(args)
    return (a.pop("q"), a.pop("kv"), a.pop("indices")), a


@pytest.mark.parametrize("name", OPCHECK_CASES)
def test_opcheck(name):
    args = CASES_BY_NAME[name].make(torch.float32)
    for k in ("q", "kv", "v", "q_rope", "kv_rope", "attn_sink"):
        if k in args:
            args[k] = args[k].clone().requires_grad_(True)
    pos, kw = _split(args)
    torch.library.opcheck(torch.ops.attention.selective_attention.default, pos, kw)


def test_schema_has_every_argument_but_return_lse():
    schema = str(torch.ops.attention.selective_attention.default._schema)
    for name in ("q", "kv", "indices", "v", "d_v", "q_rope", "kv_rope", "sm_scale", "block_size", "cu_seqlens_q",
                 "cu_seqlens_k", "block_table", "seqlens_k", "causal", "attn_sink", "backend"):
        assert f" {name}" in schema
    assert "return_lse" not in schema
    assert schema.endswith("-> (Tensor, Tensor)")


@pytest.mark.parametrize("name", ["mqa_latent", "paged_latent_rope_sink_causal"])
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
