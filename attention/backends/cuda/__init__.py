"""Loader of the CUDA C++ top-k (csrc/cuda, extension ``attention._cuda_topk``) as a selection backend.

Never breaks ``import attention``: when the extension is not built (no CUDA torch or no nvcc at
install time) the backend reports why through ``unavailable_reasons``. attention/selection.py
registers it as the CUDA kernel of ``torch.ops.attention.topk_indices`` when it is available.
It implements ``topk_indices`` only; the registry chooses other backends for every other op.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import List

import torch

from ...inputs import FLOAT_DTYPES
from ...registry import Backend

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


class CudaTopkBackend(Backend):
    name = "cuda"
    description = "CUDA C++ top-k (csrc/cuda: multi-CTA coarse histogram, shared-memory finish) for topk_indices"
    priorities = {"cuda": 0}
    ops = {"topk_indices": frozenset({"lengths"})}  # per-row lengths: clamped in the kernel (row_width)
    # float64 scores are not declared: the kernel ranks float32 keys, and float64 scores are ranked in
    # float64 by the reference (docs/selection.md).
    dtypes = frozenset(FLOAT_DTYPES)

    def unavailable_reasons(self) -> List[str]:
        if _ext is None:
            return [f"extension attention._cuda_topk {_IMPORT_ERROR}"]
        if not torch.cuda.is_available():
            return ["no CUDA device"]
        return []

    def limit_reasons(self, inp) -> List[str]:
        return [f"k={inp.k} > {MAX_K}"] if inp.k > MAX_K else []

    def forward(self, inp):
        return _ext.topk_indices(inp.scores, inp.k, inp.lengths)


BACKEND = CudaTopkBackend()
