"""Build: pure-Python packages plus optional native extensions.

Each extension is built only where its toolchain exists, and skipped cleanly otherwise, so a plain
``pip install .`` works on any machine:
- ``attention._ascendc_twin``: the AscendC kernel source compiled for the CPU against our twin
  header (pybind11, host C++ compiler) - always built (see csrc/ascend/README.md);
- ``attention._ascendc_npu``: the same kernel for the NPU with CANN's compiler, when
  ``ASCEND_HOME_PATH`` is set;
- ``attention._cuda_topk``: the CUDA C++ top-k, when torch has CUDA and nvcc is found.
The per-extension logic lives in ``build_ext_config.py`` beside this file.
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from build_ext_config import extensions_and_cmdclass  # noqa: E402
except ImportError:  # pragma: no cover - the file is part of the repository
    def extensions_and_cmdclass():
        return [], {}

ext_modules, cmdclass = extensions_and_cmdclass()

setup(
    packages=find_packages(include=["attention", "attention.*", "python_ref", "python_ref.*"]),
    package_data={"attention": ["tuning/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
