"""Build description of the CUDA C++ extension ``attention._cuda_topk`` (loaded by build_ext_config.py).

Built only where torch has CUDA (``torch.version.cuda``) and nvcc is found; [] otherwise, so a CPU
machine installs cleanly. The kernel (topk.cu) is raw-pointer CUDA that ``make cuda-check`` compiles
anywhere nvcc exists; the binding (topk_binding.cpp) needs torch's CUDA headers.

``ATTENTION_BUILD_CUDA=0`` leaves it out of ``pip install``. Run as a script
(``python csrc/cuda/build_ext.py``) this file builds only this extension, in place
(``attention/_cuda_topk*.so``): bench/gpu_check.sh installs without it and builds it as a separate
step, so a broken nvcc or torch header costs that step, never the install.
"""

from __future__ import annotations

import os
import shutil
import sys

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


def skip_reason(honour_env: bool = True):
    """Why the extension is not built here, or None."""
    if honour_env and os.environ.get("ATTENTION_BUILD_CUDA", "1") == "0":
        return "ATTENTION_BUILD_CUDA=0"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    if _nvcc() is None:
        return "nvcc not found"
    return None


def _extension():
    from torch.utils.cpp_extension import CUDAExtension

    rel = lambda f: os.path.relpath(os.path.join(HERE, f), ROOT)  # noqa: E731  (setuptools wants relative paths)
    return CUDAExtension(
        name="attention._cuda_topk",
        sources=[rel("topk_binding.cpp"), rel("topk.cu")],
        include_dirs=[HERE],
        # No -std here: BuildExtension picks the standard the installed torch needs (C++17 or C++20).
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )


def extensions() -> list:
    return [] if skip_reason() else [_extension()]


def build_inplace() -> int:
    """Build attention/_cuda_topk*.so in the checkout; 0 when built or when there is nothing to build."""
    why = skip_reason(honour_env=False)
    if why:
        print(f"attention._cuda_topk not built: {why}")
        return 0
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension

    os.chdir(ROOT)
    setup(name="attention-cuda-topk", ext_modules=[_extension()],
          cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
          script_args=["build_ext", "--inplace"])
    print("attention._cuda_topk built in place")
    return 0


if __name__ == "__main__":
    sys.exit(build_inplace())
