"""Build description of the CUDA C++ extension ``attention._cuda_topk`` (loaded by build_ext_config.py).

Built only where torch has CUDA (``torch.version.cuda``) and nvcc is found; [] otherwise, so a CPU
machine installs cleanly. The kernel (topk.cu) is raw-pointer CUDA that ``make cuda-check`` compiles
anywhere nvcc exists; the binding (topk_binding.cpp) needs torch's CUDA headers.
"""

from __future__ import annotations

import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _nvcc():
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover
        CUDA_HOME = None
    cands = [shutil.which("nvcc")]
    if CUDA_HOME:
        cands.append(os.path.join(CUDA_HOME, "bin", "nvcc"))
    return next((c for c in cands if c and os.path.exists(c)), None)


def extensions() -> list:
    try:
        import torch
    except ImportError:
        return []
    if not torch.version.cuda or _nvcc() is None:
        return []
    from torch.utils.cpp_extension import CUDAExtension

    rel = lambda f: os.path.relpath(os.path.join(HERE, f), ROOT)  # noqa: E731  (setuptools wants relative paths)
    return [CUDAExtension(
        name="attention._cuda_topk",
        sources=[rel("topk_binding.cpp"), rel("topk.cu")],
        include_dirs=[HERE],
        # No -std here: BuildExtension picks the standard the installed torch needs (C++17 or C++20).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )]
