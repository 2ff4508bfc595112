"""Loader of the CUDA C++ top-k (csrc/cuda, extension ``attention._cuda_topk``) as a selection backend.

Never breaks ``import attention``: when the extension is not built (no CUDA torch or no nvcc at
install time) the backend reports why through ``unavailable_reasons``. attention/selection.py
registers it as the CUDA kernel of ``torch.ops.attention.topk_indices`` when it is available.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import List

import torch

from ...selection import SelectionBackend

_ext = None
if importlib.util.find_spec("attention._cuda_topk") is None:
    _IMPORT_ERROR = "not built: setup.py builds it only where torch has CUDA and nvcc is found"
else:
    try:
        _ext = importlib.import_module("attention._cuda_topk")
        _IMPORT_ERROR = None
    except ImportError as e:  # built for another torch / CUDA: report, never break import attention
        _IMPORT_ERROR = f"failed to load: {e}"

MAX_K = 2048 if _ext is None else int(_ext.max_k)


class CudaTopkSelection(SelectionBackend):
    name = "cuda"
    devices = frozenset({"cuda"})
    ops = frozenset({"topk_indices"})
    priority = 0

    def unavailable_reasons(self) -> List[str]:
        if _ext is None:
            return [f"extension attention._cuda_topk {_IMPORT_ERROR}"]
        if not torch.cuda.is_available():
            return ["no CUDA device"]
        return []

    def not_supported_reasons(self, inp) -> List[str]:
        reasons = super().not_supported_reasons(inp)
        if inp.op == "topk_indices" and inp.k > MAX_K:
            reasons.append(f"k={inp.k} > {MAX_K}")
        if inp.op == "topk_indices" and inp.scores.dtype == torch.float64:
            # the kernel ranks float32 keys; float64 scores are ranked in float64 (docs/selection.md)
            reasons.append("float64 scores (the kernel ranks float32)")
        return reasons

    def run(self, inp):
        return _ext.topk_indices(inp.scores, inp.k)


SELECTION_BACKEND = CudaTopkSelection()
