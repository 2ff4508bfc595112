"""The reference's two chunk strategies (per-token gather, chunk-union dense) agree with the oracle."""

import dataclasses
import sys

import pytest
import torch

import python_ref
from attention.testing import CASES_BY_NAME, TOLERANCES, oracle

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
