"""The `triton` backend: Triton kernels on NVIDIA GPUs; CPU tensors under ``TRITON_INTERPRET=1``.

Importing this module never fails because Triton is missing: the backend then reports why in
``unavailable_reasons()`` (and ``python -m attention.info`` shows it).
"""

from __future__ import annotations

from .backend import BACKEND, TritonBackend  # noqa: F401

__all__ = ["BACKEND", "TritonBackend"]
