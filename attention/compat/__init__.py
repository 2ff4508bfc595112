"""Migration shims: vendor sparse-attention APIs on top of ``attention.selective_attention``.

* ``attention.compat.flash_mla``: FlashMLA's ``flash_mla_sparse_fwd``, ``flash_mla_with_kvcache``,
  ``get_mla_metadata``.
* ``attention.compat.npu``: torch_npu's ``npu_sparse_flash_attention`` and ``npu_lightning_indexer``.

Each keeps the vendor's documented shapes and conventions and drops the vendor's hardware limits;
docs/migration.md maps every argument and lists every semantic difference. Every shim takes
``backend=None`` (passed to ``selective_attention``), so the same model code runs on any backend.
"""

from . import flash_mla, npu  # noqa: F401

__all__ = ["flash_mla", "npu"]
