"""The `reference` backend: python_ref on any device, for every op. The CPU production path and the
fallback everywhere else; its backward is the analytical one every backend inherits."""

from __future__ import annotations

import python_ref
import torch

from ...inputs import FLOAT_DTYPES
from ...registry import ATTENTION_FEATURES, SELECTION_FEATURES, Backend


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch (python_ref): chunked gather, float32 compute; any device"
    priorities = {"cpu": 0, "*": 1000}  # first on the CPU, last resort on accelerators
    ops = {"attention": ATTENTION_FEATURES, "attention_backward": ATTENTION_FEATURES,
           "lightning_indexer": SELECTION_FEATURES, "topk_indices": SELECTION_FEATURES,
           "select": SELECTION_FEATURES, "merge": frozenset()}
    dtypes = frozenset(FLOAT_DTYPES) | {torch.float64}  # float64: selection scores (topk_indices)

    def forward(self, inp):
        op = inp.op
        if op == "attention":
            return python_ref.selective_attention(inp.q, inp.kv, inp.indices, **inp.reference_kwargs())
        if op == "topk_indices":
            return python_ref.topk_indices(inp.scores, inp.k, inp.lengths)
        if op == "merge":
            return python_ref.merge_attention_states(inp.outs, inp.lses, inp.attn_sink)
        if op == "lightning_indexer":
            return python_ref.lightning_indexer(inp.q_idx, inp.k_idx, inp.weights, **inp.indexer_kwargs())
        return python_ref.select(inp.q_idx, inp.k_idx, inp.weights, inp.k, block_size=inp.block_size,
                                 block_reduce=inp.block_reduce, **inp.indexer_kwargs())


BACKEND = ReferenceBackend()
