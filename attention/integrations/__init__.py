"""Integrations of ``selective_attention`` with model libraries.

``attention.integrations.paged_cache`` needs only torch; ``attention.integrations.transformers`` imports
Hugging Face transformers lazily, inside its functions, so importing this package never requires it.
"""

from .paged_cache import PagedLatentCache

__all__ = ["PagedLatentCache"]
