"""Pieces shared by the vendor shims: argument checks, the per-row max logit, selection backend names.

The shims translate a vendor's layouts and conventions into one call of
``attention.selective_attention``; nothing here computes attention itself. The argument checks are
the package's one set (attention/inputs.py), so a shim's errors read like the op's.
"""

from __future__ import annotations

from typing import Optional

from python_ref import max_logits  # noqa: F401  (the row max some vendor APIs return beside lse)

from ..inputs import need_choice, need_int_tensor, need_rank, need_tensor  # noqa: F401

__all__ = ["max_logits", "need_choice", "need_int_tensor", "need_rank", "need_tensor", "selection_backend_for"]


def selection_backend_for(ops, backend: Optional[str]) -> dict:
    """``{op: backend or None}`` for the selection ops one vendor call runs, given the one ``backend``
    name its caller passed.

    A selection backend implements only some ops (Triton: the indexer and the fused select; CUDA:
    top-k only), while a vendor call may chain several (``npu_lightning_indexer(return_value=True)``:
    ``lightning_indexer`` then ``topk_indices``). The name goes to the ops its backend implements and
    the others choose automatically, instead of forwarding it where it can only fail. A name no
    selection backend has, or one whose backend implements none of ``ops``, is a ValueError.
    """
    if backend is None:
        return {op: None for op in ops}
    from ..selection import selection_backends

    by_name = {b.name: b for b in selection_backends()}
    if backend not in by_name:
        raise ValueError(f"backend must be None or a selection backend {sorted(by_name)}, got {backend!r}")
    b = by_name[backend]
    if not any(b.implements(op) for op in ops):
        raise ValueError(f"backend {backend!r} implements {sorted(b.ops)}, none of the ops this call runs "
                         f"({', '.join(ops)})")
    return {op: backend if b.implements(op) else None for op in ops}
