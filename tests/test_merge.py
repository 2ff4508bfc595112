"""merge_attention_states (docs/spec.md section 6) against its float64 oracle, on every implementation this
machine can run (reference; triton under TRITON_INTERPRET=1), plus the end-to-end property it exists
for: merging the partials of disjoint candidate sets equals one selective_attention call.

Outputs of the Triton path start NaN-filled (ATTENTION_NAN_FILL=1, tests/conftest.py), so an element
the kernel does not write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

import attention
import python_ref
from attention import registry
from attention.merge import MergeInputs

IMPLS = [b.name for b in registry.backends("merge")]
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 1e-2), torch.bfloat16: (3e-2, 1e-2)}


def _run(impl, *args, **kw):
    probe = MergeInputs(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1), None, impl)
    reasons = registry.get_backend(impl).not_supported_reasons(probe)
    if reasons:
        pytest.skip(f"{impl}: {'; '.join(reasons)}")
    return attention.merge_attention_states(*args, backend=impl, **kw)


def _parts(N, T, H, Dv, dtype, seed, empty_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(N, T, H, Dv, generator=g).to(dtype)
    lses = torch.randn(N, T, H, generator=g) * 4
    empty = torch.rand(N, T, H, generator=g) < empty_frac
    lses[empty] = float("-inf")
    lses[:, 0, 0] = float("-inf")  # one (token, head) with every part empty
    # An empty part's output is never read: fill it with NaN so a read shows.
    outs[empty] = float("nan")
    outs[:, 0, 0] = float("nan")
    return outs, lses


def _check(out, lse, ref_out, ref_lse, dtype):
    atol_o, atol_l = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out.double() - ref_out).abs().max().item() <= atol_o
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.equal(lse[~fin], ref_lse[~fin].float())
    if fin.any():
        assert (lse.double()[fin] - ref_lse[fin]).abs().max().item() <= atol_l


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(1, 3, 4, 16), (2, 5, 3, 40), (5, 4, 17, 64), (3, 2, 2, 576)],
                         ids=lambda s: "N{}-T{}-H{}-Dv{}".format(*s))
@pytest.mark.parametrize("sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_matches_oracle(impl, shape, dtype, sink):
    N, T, H, Dv = shape
    outs, lses = _parts(N, T, H, Dv, dtype, seed=N * 1000 + Dv)
    attn_sink = torch.randn(H, generator=torch.Generator().manual_seed(7)) if sink else None
    out, lse = _run(impl, outs, lses, attn_sink=attn_sink)
    ref_out, ref_lse = python_ref.merge_attention_states_dense(outs, lses, attn_sink)
    _check(out, lse, ref_out, ref_lse, dtype)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0])) and lse[0, 0].item() == float("-inf")


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_strided_and_list_inputs(impl):
    """Views with arbitrary strides (a transposed gather buffer, a sliced lse, a stride-0 sink) give
    the same result as contiguous copies; a list of parts equals the stacked tensor."""
    N, T, H, Dv = 3, 4, 6, 24
    outs, lses = _parts(N, T, H, Dv, torch.float32, seed=3)
    buf = torch.full((T, N, H, Dv + 5), float("nan"))
    buf[..., 2:Dv + 2] = outs.transpose(0, 1)
    outs_v = buf[..., 2:Dv + 2].transpose(0, 1)  # [N, T, H, Dv], no unit stride on N or T
    lbuf = torch.full((N, T, 2 * H), float("nan"))
    lbuf[..., ::2] = lses
    lses_v = lbuf[..., ::2]
    sink = torch.tensor([0.5]).expand(H)
    assert not outs_v.is_contiguous() and not lses_v.is_contiguous() and sink.stride(0) == 0
    out, lse = _run(impl, outs_v, lses_v, attn_sink=sink)
    ref_out, ref_lse = python_ref.merge_attention_states_dense(outs, lses, sink.contiguous())
    _check(out, lse, ref_out, ref_lse, torch.float32)
    out_l, lse_l = _run(impl, list(outs), list(lses), attn_sink=sink)
    torch.testing.assert_close(out_l, out, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse_l, lse, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_nan_propagates_like_the_op(impl):
    """A NaN in a non-empty part poisons exactly its (token, head); NaN in an empty part does not."""
    N, T, H, Dv = 3, 3, 4, 16
    outs, lses = _parts(N, T, H, Dv, torch.float32, seed=11, empty_frac=0.0)
    lses[:, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
    outs[:, 0, 0] = 1.0
    outs[1, 1, 2, 5] = float("nan")  # non-empty part: out NaN there, lse finite
    lses[2, 2, 3] = float("nan")  # NaN lse: out and lse NaN
    lses[0, 2, 1] = float("-inf")
    outs[0, 2, 1] = float("nan")  # empty part holding NaN: ignored
    out, lse = _run(impl, outs, lses, attn_sink=torch.zeros(H))
    ref_out, ref_lse = python_ref.merge_attention_states_dense(outs, lses, torch.zeros(H))
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out))
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    assert torch.isnan(out[1, 2, 5]) and torch.isnan(out[1, 2]).sum() == 1 and torch.isfinite(lse[1, 2])
    assert torch.isnan(out[2, 3]).all() and torch.isnan(lse[2, 3])
    assert torch.isfinite(out[2, 1]).all()
    ok = ~torch.isnan(ref_out)
    assert (out.double()[ok] - ref_out[ok]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_no_parts_and_all_empty(impl):
    T, H, Dv = 2, 3, 8
    out, lse = _run(impl, torch.zeros(0, T, H, Dv), torch.zeros(0, T, H), attn_sink=torch.ones(H))
    assert torch.equal(out, torch.zeros(T, H, Dv)) and torch.equal(lse, torch.full((T, H), float("-inf")))
    outs = torch.full((2, T, H, Dv), float("nan"))
    out, lse = _run(impl, outs, torch.full((2, T, H), float("-inf")), attn_sink=torch.ones(H))
    assert torch.equal(out, torch.zeros(T, H, Dv)) and torch.equal(lse, torch.full((T, H), float("-inf")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_of_disjoint_partials_equals_one_call(impl, dtype):
    """Split each token's candidates into 3 disjoint sets (one empty for some tokens), run the op on each
    without sink, merge with the sink: the float64 oracle of the whole call (GQA, latent, causal)."""
    g = torch.Generator().manual_seed(5)
    T, H, Hkv, D, Dv, S, K = 4, 8, 2, 48, 32, 50, 12
    q = torch.randn(T, H, D, generator=g).to(dtype)
    kv = torch.randn(S, Hkv, D, generator=g).to(dtype)
    idx = torch.randint(-2, S + 3, (T, Hkv, K), generator=g, dtype=torch.int32)
    sink = torch.randn(H, generator=g)
    owner = torch.randint(0, 3, (T, Hkv, K), generator=g)
    owner[0] = 1  # token 0: part 0 and part 2 have no candidate
    outs, lses = [], []
    for r in range(3):
        part = torch.where(owner == r, idx, -1)
        o, l = attention.selective_attention(q, kv, part, d_v=Dv, causal=True, return_lse=True)
        outs.append(o)
        lses.append(l)
    out, lse = _run(impl, outs, lses, attn_sink=sink)
    ref_out, ref_lse = python_ref.selective_attention_dense(q, kv, idx, d_v=Dv, causal=True, attn_sink=sink)
    _check(out, lse, ref_out.double(), ref_lse.double(), dtype)


def _bad(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_merge_bad_inputs_name_the_argument():
    o, l = torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 4)
    m = attention.merge_attention_states
    _bad(lambda: m(o[0], l), ValueError, "outs must be")
    _bad(lambda: m(o, l[..., :3]), ValueError, "lses must have shape")
    _bad(lambda: m(o.int(), l), TypeError, "outs must be float32")
    _bad(lambda: m(o, l.int()), TypeError, "lses must be a float")
    _bad(lambda: m(o, l, attn_sink=torch.zeros(5)), ValueError, "attn_sink must have shape")
    _bad(lambda: m(o, l, attn_sink=torch.zeros(4, dtype=torch.int32)), TypeError, "attn_sink must be a float")
    _bad(lambda: m(o, l.to("meta")), ValueError, "lses must be on outs' device")
    _bad(lambda: m([o[0], o[1, :2]], l), ValueError, r"outs\[1\] must match")
    _bad(lambda: m([], l), ValueError, "outs must hold at least one part")
    _bad(lambda: m("x", l), TypeError, "outs must be a torch.Tensor")
    _bad(lambda: m(o, l, backend="nope"), ValueError, "backend must be one of")
    _bad(lambda: m(o, l, backend=3), TypeError, "backend must be a str")
    # The op validates too (the schema's entry point), with the same messages.
    _bad(lambda: torch.ops.attention.merge_attention_states(o, l[..., :3]), ValueError, "lses must have shape")


def test_merge_op_opcheck_and_compile():
    o, l = _parts(2, 3, 4, 8, torch.float32, seed=1, empty_frac=0.0)
    sink = torch.randn(4)
    torch.library.opcheck(torch.ops.attention.merge_attention_states.default, (o, l, sink, None),
                          test_utils=("test_schema", "test_faketensor"))
    f = torch.compile(lambda a, b, s: attention.merge_attention_states(a, b, attn_sink=s), fullgraph=True,
                      backend="eager")
    out, lse = f(o, l, sink)
    ref_out, ref_lse = python_ref.merge_attention_states_dense(o, l, sink)
    _check(out, lse, ref_out, ref_lse, torch.float32)


def test_merge_backend_is_the_registrys_choice():
    # The merge is chosen like every op: the reference first on the CPU (the Triton kernel runs here
    # only when forced, under the interpreter), and a backend without the op cannot be forced.
    from attention.merge import choose_merge_backend

    inp = MergeInputs(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1))
    assert choose_merge_backend(inp).name == "reference"
    assert "merge" in registry.OPS and all("merge" in b.ops for b in registry.backends("merge"))
    with pytest.raises(ValueError, match="ascendc"):
        attention.merge_attention_states(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1), backend="ascendc")
