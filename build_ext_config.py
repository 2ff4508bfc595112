"""Which native extensions to build on this machine (imported by setup.py).

Sections are filled in by the backend that owns them; each returns [] when its toolchain is missing.
"""

from __future__ import annotations


def _ascendc_extensions():
    return []


def _cuda_extensions():
    return []


def extensions_and_cmdclass():
    exts = []
    exts += _ascendc_extensions()
    exts += _cuda_extensions()
    cmdclass = {}
    if exts:
        try:
            from torch.utils.cpp_extension import BuildExtension

            cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)
        except Exception:  # pragma: no cover
            pass
    return exts, cmdclass
