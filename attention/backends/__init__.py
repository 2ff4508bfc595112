"""Backends register themselves here, in one discovery loop. Optional ones never break ``import attention``.

Each module ``attention.backends.<name>`` defines ``BACKEND`` (a ``registry.Backend``: which ops it
implements, on which devices, with which features). A module that cannot work on this machine still
imports and reports why through ``unavailable_reasons()``; a genuine import error becomes a warning,
never an import failure of the package.
"""

from __future__ import annotations

import importlib
import warnings

from ..registry import register_backend

_BUILTIN = ("reference", "triton", "cuda", "ascendc")

for _name in _BUILTIN:
    try:
        _mod = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(f"{__name__}.{_name}"):
            continue  # backend not shipped
        warnings.warn(f"attention: optional backend {_name!r} failed to import: {e}", RuntimeWarning)
        continue
    except Exception as e:  # pragma: no cover - defensive: never break import attention
        warnings.warn(f"attention: optional backend {_name!r} failed to import: {e!r}", RuntimeWarning)
        continue
    _b = getattr(_mod, "BACKEND", None)
    if _b is not None:
        register_backend(_b)
