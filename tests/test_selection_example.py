"""The end-to-end decode example of docs/selection.md runs as written, and its answer is right."""

import os
import re

import torch

import python_ref

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "selection.md")


def _example_source() -> str:
    text = open(DOC).read()
    section = text.split("## End-to-end", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_decode_example_runs_and_is_right(capsys):
    ns = {}
    exec(compile(_example_source(), DOC, "exec"), ns)  # noqa: S102 - our own documentation
    indices, out = ns["indices"], ns["out"]
    assert tuple(indices.shape) == (2, 1, 2048) and indices.dtype == torch.int32
    assert (indices >= 0).sum(-1).flatten().tolist() == [2048, 1500]
    # Sequence 1 has 1500 <= 2048 keys: all selected, in score order, so its output is full attention.
    assert sorted(indices[1, 0, :1500].tolist()) == list(range(1500))
    # The selection is the oracle's up to float32 rounding: 3000 random scores hold near ties, so
    # compare the oracle's scores at the chosen positions with its own top-k scores, rank by rank.
    s64 = python_ref.lightning_indexer_dense(ns["q_idx"], ns["k_idx_cache"], ns["weights"], max_seqlen_k=64 * 64,
                                             causal=True, **ns["paged"])
    exp = python_ref.topk_indices_dense(s64, 2048)
    assert torch.equal(indices < 0, exp < 0)
    at = lambda i: torch.where(i >= 0, s64.gather(1, i.view(2, -1).clamp_min(0).long()), 0.0)  # noqa: E731
    assert (at(indices) - at(exp)).abs().max() <= 1e-5 * s64[torch.isfinite(s64)].abs().max()
    assert (indices != exp).float().mean() < 0.01  # only a few near-tie swaps
    ref, _ = python_ref.selective_attention_dense(ns["q"], ns["kv_cache"], indices, d_v=512, sm_scale=192 ** -0.5,
                                                  causal=True, **ns["paged"])
    assert (out.double() - ref).abs().max() <= 3e-2  # bfloat16 tolerance of docs/spec.md section 4
    assert "torch.Size([2, 16, 512]) [2048, 1500]" in capsys.readouterr().out
