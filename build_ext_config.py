"""Which native extensions to build on this machine (imported by setup.py).

Each native directory owns its build description in ``csrc/<name>/build_ext.py``, which defines
``extensions() -> list`` (setuptools Extension objects) and returns [] when its toolchain is missing,
so a machine without nvcc or CANN still installs cleanly.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    path = os.path.join(HERE, "csrc", name, "build_ext.py")
    if not os.path.exists(path):
        return []
    spec = importlib.util.spec_from_file_location(f"_attention_build_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return list(mod.extensions())
    except Exception as e:  # a broken optional toolchain must not break the install
        warnings.warn(f"csrc/{name}: extension skipped: {e}")
        return []


def extensions_and_cmdclass():
    exts = _load("ascend") + _load("cuda")
    cmdclass = {}
    if exts:
        try:
            from torch.utils.cpp_extension import BuildExtension

            cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)
        except Exception:  # pragma: no cover
            pass
    return exts, cmdclass
