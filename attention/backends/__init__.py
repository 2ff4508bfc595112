"""Backends register themselves here. Optional ones must never break ``import attention``."""

from __future__ import annotations

import importlib
import warnings

from ..registry import register_backend
from .reference import ReferenceBackend

register_backend(ReferenceBackend())

# Optional backends: each module defines BACKEND (a Backend instance) and may fail to import
# only for reasons it reports itself through unavailable_reasons(); a genuine import error is
# turned into a warning, never an import failure of the package.
_OPTIONAL = ("triton", "ascendc")

for _name in _OPTIONAL:
    try:
        _mod = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(f"{__name__}.{_name}"):
            continue  # backend not written yet / not shipped
        warnings.warn(f"attention: optional backend {_name!r} failed to import: {e}", RuntimeWarning)
        continue
    except Exception as e:  # pragma: no cover - defensive: never break import attention
        warnings.warn(f"attention: optional backend {_name!r} failed to import: {e!r}", RuntimeWarning)
        continue
    _b = getattr(_mod, "BACKEND", None)
    if _b is not None:
        register_backend(_b)
