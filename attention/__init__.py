"""attention: one selective (sparse / latent) attention op for every chip.

``attention.selective_attention`` computes docs/spec.md section 1 on the CPU (pure PyTorch), NVIDIA GPUs
(Triton) and Ascend NPUs (AscendC), chosen by a backend registry; it is also registered as
``torch.ops.attention.selective_attention``.
"""

from . import backends as _backends  # noqa: F401  (registers the built-in backends)
from .api import quantize_kv, selective_attention
from .inputs import SelectiveAttentionInputs, validate
from .merge import merge_attention_states  # docs/spec.md section 6
from .ops import selective_attention_op
from .registry import Backend, backends, choose_backend, get_backend, register_backend, unregister_backend
from .selection import block_scores, lightning_indexer, select, topk_indices  # docs/spec.md section 2
from . import distributed  # noqa: E402  (context parallel over torch.distributed: attention.distributed.*)

__version__ = "0.1.0"

__all__ = [
    "selective_attention", "selective_attention_op", "SelectiveAttentionInputs", "validate", "Backend",
    "backends", "choose_backend", "get_backend", "register_backend", "unregister_backend", "__version__",
    "lightning_indexer", "topk_indices", "select", "block_scores", "merge_attention_states", "quantize_kv",
]
