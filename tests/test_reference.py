"""The reference's two chunk strategies (per-token gather, chunk-union dense) agree with the oracle."""

import dataclasses
import sys

import pytest
import torch

import python_ref
from attention.testing import CASES, CASES_BY_NAME, TOLERANCES, max_error, oracle

REF = sys.modules["python_ref.selective_attention"]

# Many tokens selecting heavily overlapping positions: the chunk-union path's home ground.
OVERLAP = [
    dataclasses.replace(CASES_BY_NAME["causal"], name="u_causal", seqs=((24, 30),), K=20),
    dataclasses.replace(CASES_BY_NAME["duplicates"], name="u_dup", seqs=((16, 25),), K=18),
    dataclasses.replace(CASES_BY_NAME["paged_latent_rope_sink_causal"], name="u_paged", seqs=((12, 19), (10, 23)), K=16),
    dataclasses.replace(CASES_BY_NAME["gqa_separate_v"], name="u_gqa_v", seqs=((16, 20),), K=16),
    dataclasses.replace(CASES_BY_NAME["gqa_shared_indices"], name="u_shared", seqs=((16, 20),), K=16),
    dataclasses.replace(CASES_BY_NAME["block_causal_varlen"], name="u_block", seqs=((12, 17), (8, 30)), K=6),
    dataclasses.replace(CASES_BY_NAME["varlen"], name="u_varlen_garbage", seqs=((10, 11), (12, 14)), K=14),
]


@pytest.mark.parametrize("case", OVERLAP, ids=lambda c: c.name)
@pytest.mark.parametrize("strategy", ["union", "gather"])
def test_chunk_strategies_match_oracle(case, strategy, monkeypatch):
    calls = []
    real = REF._chunk_union

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(REF, "_chunk_union", spy)
    if strategy == "gather":
        monkeypatch.setattr(REF, "_union_rows", lambda *a, **k: None)
    args = case.make(torch.float32)
    a = dict(args)
    q, kv, idx = a.pop("q"), a.pop("kv"), a.pop("indices")
    out, lse = python_ref.selective_attention(q, kv, idx, **a)
    ref_out, ref_lse = oracle(args)
    assert (out.double() - ref_out).abs().max() <= TOLERANCES[torch.float32][0]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double() - ref_lse)[finite].abs().max() <= TOLERANCES[torch.float32][1]
    assert bool(calls) == (strategy == "union"), "the strategy under test did not run"


# One query token over one contiguous sequence (a decode step) takes the reference's lean path
# (one index_select + PyTorch's CPU flash-attention kernel) whenever no candidate is dropped; any
# dropped candidate sends it back to the general path. Every case of the matrix, as one token.
def _one_token(case, index_mode):
    L = max(lk for _, lk in case.seqs)
    return dataclasses.replace(case, name=f"one_{case.name}_{index_mode}", seqs=((1, L),), varlen_api=False,
                               index_mode=case.index_mode if index_mode == "own" else index_mode,
                               poison=tuple(p for p in case.poison if p[0] == 0 and p[1] < L))


ONE_TOKEN = [_one_token(c, m) for c in CASES if not c.page_size and c.block_size == 1 for m in ("own", "valid")]


def _lean_path_runs(monkeypatch):
    calls = []
    real = REF._FLASH_CPU

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(REF, "_FLASH_CPU", spy)
    return calls


def _check_against_oracle(args, out, lse, dtype=torch.float32):
    ref_out, ref_lse = oracle(args)
    assert out.dtype == args["q"].dtype and out.shape == ref_out.shape and lse.dtype == torch.float32
    assert max_error(out, ref_out) <= TOLERANCES[dtype][0]
    assert max_error(lse, ref_lse) <= TOLERANCES[dtype][1]


@pytest.mark.parametrize("case", ONE_TOKEN, ids=lambda c: c.name)
def test_one_token_matches_oracle(case, monkeypatch):
    calls = _lean_path_runs(monkeypatch)
    dtype = torch.bfloat16 if "deepseek" in case.name else torch.float32
    args = case.make(dtype)
    a = dict(args)
    out, lse = python_ref.selective_attention(a.pop("q"), a.pop("kv"), a.pop("indices"), **a)
    _check_against_oracle(args, out, lse, dtype)
    L = case.seqs[0][1]
    same_width = case.latent or case.Dv == case.Dqk + case.Dr
    if case.index_mode in ("valid", "dup") and case.K > 0 and L > 0 and same_width and case.kv_quant is None:
        assert calls, "the lean one-token path did not run"
    kept = case.index_mode != "none_valid" and case.K > 0 and L > 0
    if not kept:
        assert not calls, "the lean path ran although every candidate is dropped"


@pytest.mark.parametrize("dropped", ["negative", "past_the_end", "after_the_query"])
@pytest.mark.parametrize("shared", [True, False])
def test_one_token_with_a_dropped_candidate_takes_the_general_path(dropped, shared, monkeypatch):
    # Token 3 of 5 over 12 positions, causal: it sees positions 0..9 (q_pos = 12 - 5 + 3 = 10 - 1 + ...).
    g = torch.Generator().manual_seed(0)
    T, t, L, H, Hkv = 5, 3, 12, 4, 2
    q = torch.randn(T, H, 16, generator=g)
    kv = torch.randn(L, Hkv, 16, generator=g)
    idx = torch.randint(0, L - T + t + 1, (T, 1 if shared else Hkv, 6), generator=g, dtype=torch.int32)
    bad = {"negative": -1, "past_the_end": L, "after_the_query": L - T + t + 1}[dropped]
    idx[t, 0, 2] = bad
    calls = _lean_path_runs(monkeypatch)
    out, lse = python_ref.selective_attention(q[t:t + 1], kv, idx[t:t + 1], causal=True, token_offset=t,
                                              total_tokens=T)
    assert not calls
    ref_out, ref_lse = python_ref.selective_attention_dense(q, kv, idx, causal=True)
    assert (out[0].double() - ref_out[t]).abs().max() <= 1e-4
    assert (lse[0].double() - ref_lse[t]).abs().max() <= 1e-4
    idx[t, 0, 2] = 0  # every candidate kept: the lean path, same answer as the oracle
    out, lse = python_ref.selective_attention(q[t:t + 1], kv, idx[t:t + 1], causal=True, token_offset=t,
                                              total_tokens=T)
    assert calls
    ref_out, ref_lse = python_ref.selective_attention_dense(q, kv, idx, causal=True)
    assert (out[0].double() - ref_out[t]).abs().max() <= 1e-4
    assert (lse[0].double() - ref_lse[t]).abs().max() <= 1e-4


@pytest.mark.parametrize("which", ["q", "kv", "q_rope", "v"])
def test_one_token_with_strided_last_dimension(which, monkeypatch):
    # The flash kernel reads garbage when a last dimension is strided: the lean path hands it dense rows.
    g = torch.Generator().manual_seed(1)
    shapes = dict(q=(1, 4, 24), kv=(40, 2, 24))
    shapes.update(dict(v=(40, 2, 24)) if which == "v" else dict(q_rope=(1, 4, 8), kv_rope=(40, 2, 8)) if which == "q_rope" else {})
    args = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    x = args[which]
    args[which] = torch.randn(*reversed(x.shape), generator=g).permute(*reversed(range(x.dim())))  # stride(-1) != 1
    assert args[which].stride(-1) != 1
    args["indices"] = torch.randint(0, 40, (1, 1, 9), generator=g, dtype=torch.int32)
    calls = _lean_path_runs(monkeypatch)
    a = dict(args)
    out, lse = python_ref.selective_attention(a.pop("q"), a.pop("kv"), a.pop("indices"), **a)
    assert calls
    _check_against_oracle(args, out, lse)
