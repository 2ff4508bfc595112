"""Regressions found on the Triton backend, run on every registered backend that can run them.

- strides: every tensor argument (attention and selection) may be a strided or expanded (stride 0)
  view; kernels honour strides or copy on the host (docs/spec.md section 1, "Argument rules").
- non-finite values: a NaN/inf in a *kept* candidate takes part in IEEE arithmetic as float64 would:
  NaN reaches out and lse; "empty row" is decided from indices and lengths, never from scores.
- integer widths: block counts and positions of caches near 2**31 rows must not wrap in int32.

Each test compares with the float64 oracle evaluated on contiguous copies of the same values.
"""

import math
from dataclasses import replace

import pytest
import torch

import attention
import python_ref
from attention.selection import selection_backends, validate_selection
from attention.testing import CASES_BY_NAME, TOLERANCES, max_error, oracle


def _backends():
    return [pytest.param(b.name, dev, id=f"{b.name}-{dev}") for b in attention.backends() for dev in b.test_devices()]


def _strided(x):
    """Same values, every dimension's stride doubled (x is the even elements of interleaved storage)."""
    buf = torch.zeros(x.shape + (2,), dtype=x.dtype, device=x.device)
    buf[..., 0] = x
    view = buf[..., 0]
    assert view.shape == x.shape and (x.numel() <= 1 or not view.is_contiguous())
    return view


def _expanded(x, dim):
    """Same values as x, whose slices along ``dim`` are all equal, as a stride-0 view of the first one."""
    first = x.narrow(dim, 0, 1).clone()  # own storage: reading past the first slice is out of bounds
    assert torch.allclose(first.expand_as(x), x, rtol=0, atol=0, equal_nan=True), "expand only a constant dim"
    view = first.expand(x.shape)
    assert view.stride(dim) == 0
    return view


def _run(backend, device, args):
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    inp = attention.validate(**moved)
    reasons = attention.get_backend(backend).not_supported_reasons(inp)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    out, lse = attention.selective_attention(**moved, return_lse=True, backend=backend)
    return out.cpu(), lse.cpu()


def _check(backend, device, args, contiguous_args):
    out, lse = _run(backend, device, args)
    ref_out, ref_lse = oracle({k: v.contiguous() if isinstance(v, torch.Tensor) else v
                               for k, v in contiguous_args.items()})
    tol_out, tol_lse = TOLERANCES[torch.float32]
    eo, el = max_error(out, ref_out), max_error(lse, ref_lse)
    assert eo <= tol_out and el <= tol_lse, f"{backend}: out {eo:.3g} lse {el:.3g}"


# ---- strided and expanded views of every tensor argument ----
STRIDED_CASES = ["paged_latent_rope_sink_causal", "block_causal_varlen", "rope_separate_v", "paged_separate_v_gqa",
                 "varlen_empty_sequence"]


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("case_name", STRIDED_CASES)
def test_every_tensor_argument_strided(backend, device, case_name):
    args = CASES_BY_NAME[case_name].make(torch.float32)
    if "attn_sink" not in args:
        args["attn_sink"] = torch.randn(args["q"].shape[1], generator=torch.Generator().manual_seed(1))
    views = {k: _strided(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    _check(backend, device, views, args)


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_every_tensor_argument_expanded(backend, device, paged):
    """Stride-0 views (``expand``): equal sequence lengths, two sequences sharing their pages (prefix
    sharing), one sink value for all heads, kv heads sharing storage, every token selecting the same rows."""
    case = replace(CASES_BY_NAME["paged_latent_rope_sink_causal" if paged else "rope_separate_v"],
                   name="expanded_" + str(paged), seqs=((2, 19), (3, 19)), H=4, Hkv=2, sink=True,
                   index_mode="valid", varlen_api=True)
    a = case.make(torch.float32)
    T = a["q"].shape[0]
    head_dim = 2 if paged else 1
    for k in ("kv", "kv_rope", "v"):  # kv heads equal: one stored head, expanded
        if k in a:
            a[k] = a[k].narrow(head_dim, 0, 1).expand(a[k].shape).contiguous()
    a["indices"] = a["indices"][:1].expand(a["indices"].shape).contiguous()
    a["attn_sink"] = torch.full_like(a["attn_sink"], 0.25)
    a["q"] = a["q"][:, :1].expand(a["q"].shape).contiguous()
    if paged:
        bt = a["block_table"]
        a["block_table"] = bt[:1].expand(bt.shape).contiguous()
    views = dict(a)
    views["seqlens_k" if paged else "cu_seqlens_q"] = a["seqlens_k" if paged else "cu_seqlens_q"]
    if paged:
        views["seqlens_k"] = _expanded(a["seqlens_k"], 0)
        views["block_table"] = _expanded(a["block_table"], 0)
    for k in ("kv", "kv_rope", "v"):
        if k in a:
            views[k] = _expanded(a[k], head_dim)
    views["indices"] = _expanded(a["indices"], 0)
    views["attn_sink"] = _expanded(a["attn_sink"], 0)
    views["q"] = _expanded(a["q"], 1)
    assert T == 5
    _check(backend, device, views, a)


# ---- strided and expanded views for the selection ops ----
def _sel_backends(op):
    out = []
    for b in selection_backends():
        if op in b.ops and not b.unavailable_reasons() and b.runs_on("cpu"):
            out.append(b.name)
    return out


def _selection_args(paged):
    g = torch.Generator().manual_seed(11)
    T, Hi, Di = 5, 4, 16
    a = dict(q_idx=torch.randn(T, Hi, Di, generator=g), weights=torch.randn(T, Hi, generator=g),
             cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32), causal=True)
    if paged:
        kx = torch.full((6, 8, Di), float("nan"))
        kx[[4, 1, 3]] = torch.randn(3, 8, Di, generator=g)
        a.update(k_idx=kx, block_table=torch.tensor([[4, 1, -1], [3, 4, 1]], dtype=torch.int32),
                 seqlens_k=torch.tensor([13, 21], dtype=torch.int32))
    else:
        kx = torch.randn(40, Di, generator=g)
        kx[33:] = float("nan")
        a.update(k_idx=kx, cu_seqlens_k=torch.tensor([0, 13, 33], dtype=torch.int32))
    return a


@pytest.mark.parametrize("op", ["lightning_indexer", "select"])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_selection_arguments_strided(op, paged):
    a = _selection_args(paged)
    views = {k: _strided(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    backends = _sel_backends(op)
    assert "reference" in backends
    fn = getattr(attention, op)
    extra = (dict(k=6),) if op == "select" else ()
    for name in backends:
        inp = validate_selection(op, views["q_idx"], views["k_idx"], views["weights"], *(e["k"] for e in extra),
                                 **{k: v for k, v in views.items() if k not in ("q_idx", "k_idx", "weights")})
        if attention.get_backend(name).not_supported_reasons(inp):
            continue
        got = fn(**views, **(extra[0] if extra else {}), backend=name)
        want = fn(**a, **(extra[0] if extra else {}), backend="reference")
        if op == "select":
            assert torch.equal(got, want), name
        else:
            ref = python_ref.lightning_indexer_dense(**{k: v for k, v in a.items()})
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), name
            fin = torch.isfinite(ref)
            assert float((got.double() - ref)[fin].abs().max()) <= 1e-4, name


# ---- NaN / inf in a kept candidate ----
# Backends whose fix is still pending (strict: the marker must go when the fix lands). None today:
# the AscendC twin decides empty rows from its kept count, not from its scores.
_NOT_FIXED_YET: dict = {}


def _poison_params():
    for p in _backends():
        backend = p.values[0]
        for where in ("key", "value"):
            reason = _NOT_FIXED_YET.get((backend, where))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(*p.values, where, id=f"{p.id}-{where}", marks=marks)


@pytest.mark.parametrize("backend,device,where", list(_poison_params()))
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("split", [False, True], ids=["one_split", "split_k"])
def test_nonfinite_kept_candidate_propagates(backend, device, poison, where, split):
    """Row 5 of the cache holds NaN/inf and is selected by sequence 0's tokens only: their out and lse
    are what float64 gives (NaN, or inf/NaN for inf), sequence 1's tokens stay finite and exact."""
    if split and backend != "triton":
        pytest.skip("split-K is a triton launch plan")
    case = replace(CASES_BY_NAME["varlen"], name="poisoned_kept_row", seqs=((3, 16), (2, 16)), latent=False, Dv=16,
                   H=4, Hkv=1, K=16, index_mode="valid", sink=True)
    a = case.make(torch.float32)
    T = a["q"].shape[0]
    # Every position of the sequence, three times (duplicates count): 48 candidates, 3 splits of 16.
    a["indices"] = torch.arange(16, dtype=torch.int32).repeat(3).expand(T, 1, 48).contiguous()
    (a["kv"] if where == "key" else a["v"])[5, 0, 3] = poison  # row 5 = position 5 of sequence 0
    ref_out, ref_lse = oracle(a)
    assert not torch.isfinite(ref_out[:3]).all() or not torch.isfinite(ref_lse[:3]).all()
    assert torch.isfinite(ref_out[3:]).all() and torch.isfinite(ref_lse[3:]).all()
    if split:
        from attention.backends.triton import launch

        inp = attention.validate(**a)
        override = dict(num_splits=3, BLOCK_N=16)
        assert launch.plan(inp, dict(launch.resolve_config(inp)[0], **override))["num_splits"] == 3
        out, lse = launch.forward(inp, override=override, autotune=False)
    else:
        out, lse = _run(backend, device, a)
    tol_out, tol_lse = TOLERANCES[torch.float32]
    # max_error counts a NaN against a non-NaN (and an inf against a finite) as an infinite error.
    eo, el = max_error(out, ref_out), max_error(lse, ref_lse)
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)) and torch.equal(torch.isnan(lse), torch.isnan(ref_lse)), \
        f"{backend}: NaN pattern differs (out {int(torch.isnan(out).sum())} vs {int(torch.isnan(ref_out).sum())})"
    same = ~torch.isnan(ref_out)
    assert max_error(out[same], ref_out[same]) <= tol_out and max_error(lse[~torch.isnan(ref_lse)],
                                                                         ref_lse[~torch.isnan(ref_lse)]) <= tol_lse, \
        f"{backend}: out {eo:.3g} lse {el:.3g}"


# ---- integer arithmetic that must not wrap ----
def test_long_sequence_block_count_does_not_wrap():
    """A contiguous cache of 2**31 - 2 rows (one stored row, expanded: stride 0) read in blocks of 4:
    ceil(L / block_size) computed as (L + block_size - 1) // block_size in int32 wrapped negative and
    dropped every candidate (out 0, lse -inf). Every row equals the stored one, so the float64 result
    is that row's value, and lse its score plus log(number of kept positions)."""
    from attention.backends.triton import launch

    if "triton" not in [b.name for b in attention.backends() if b.test_devices()]:
        pytest.skip("triton cannot run here")
    g = torch.Generator().manual_seed(3)
    S, bs, D = 2**31 - 2, 4, 16
    row = torch.randn(1, 1, D, generator=g)
    q = torch.randn(1, 2, D, generator=g)
    last = (S - 1) // bs
    indices = torch.tensor([[[last, -1]]], dtype=torch.int32)
    inp = attention.validate(q=q, kv=row.expand(S, 1, D), indices=indices, block_size=bs, d_v=8)
    out, lse = launch.forward(inp, override=dict(num_splits=1), autotune=False)
    kept = S - last * bs
    s = (q[0].double() @ row[0, 0].double()) * D ** -0.5
    assert max_error(out[0], row[0, 0, :8].double().expand(2, 8)) <= 1e-4
    assert max_error(lse[0], s + math.log(kept)) <= 1e-4
