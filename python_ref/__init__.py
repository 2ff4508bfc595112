"""Pure-PyTorch reference of the `attention` package's contract (docs/spec.md).

`selective_attention` is the fast, chunked reference (the CPU production path);
`selective_attention_dense` is the float64 oracle the equivalence suite compares against.
"""
from .selective_attention import (  # noqa: F401
    DEFAULT_CHUNK_BYTES,
    max_logits,
    selective_attention,
    selective_attention_backward,
    selective_attention_dense,
    token_metadata,
    tokens_per_chunk,
)
from .quantize import QUANT_MAX, dequantize, num_scales, quantize_kv  # noqa: F401
from .merge import merge_attention_states, merge_attention_states_dense  # noqa: F401
from .selection import (  # noqa: F401
    SELECT_CHUNK_BYTES,
    block_scores,
    block_scores_dense,
    lightning_indexer,
    lightning_indexer_dense,
    select,
    select_dense,
    topk_indices,
    topk_indices_dense,
)
