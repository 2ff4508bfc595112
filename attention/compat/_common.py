"""Pieces shared by the vendor shims: argument checks and the per-row max logit.

The shims translate a vendor's layouts and conventions into one call of
``attention.selective_attention``; nothing here computes attention itself. The argument checks are
the package's one set (attention/inputs.py), so a shim's errors read like the op's.
"""

from __future__ import annotations

from python_ref import max_logits  # noqa: F401  (the row max some vendor APIs return beside lse)

from ..inputs import need_choice, need_int_tensor, need_rank, need_tensor  # noqa: F401

__all__ = ["max_logits", "need_choice", "need_int_tensor", "need_rank", "need_tensor"]
