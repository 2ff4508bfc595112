"""Native extensions of csrc/ascend (loaded by build_ext_config.py at the repository root).

- ``attention._ascendc_twin``: always. The AscendC kernel source (csrc/ascend/kernel) compiled with the
  host C++ compiler against the CPU twin header (csrc/ascend/twin, reached only through this -I), plus
  the host tiling and a pybind11 binding. -O2: the equivalence matrix runs through it on every SoC.
- ``attention._ascendc_npu``: only when CANN is present (``ASCEND_HOME_PATH`` set and its ``bisheng``
  found) and torch_npu imports. The same kernel files are compiled for the chip by bisheng and linked
  with csrc/ascend/npu/npu_binding.cpp. This path has never run: no CANN toolkit or NPU was available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _rel(*parts: str) -> str:
    return os.path.relpath(os.path.join(HERE, *parts), ROOT)


KERNEL_SOURCES = [_rel("kernel", "selective_attention.cpp")]
HOST_SOURCES = [_rel("host", "tiling.cpp")]


def _twin():
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(
        "attention._ascendc_twin",
        sources=[_rel("twin_binding.cpp")] + KERNEL_SOURCES + HOST_SOURCES,
        include_dirs=[os.path.join(HERE, "twin"), os.path.join(HERE, "kernel"), os.path.join(HERE, "host")],
        # torch 2.13's headers need C++20 (bit-field initialisers); the kernel files are C++17-clean and
        # are also checked as C++17 by `make ascendc-check`
        extra_compile_args=["-O2", "-std=c++20"],
    )


def _npu():
    """The NPU extension, or None (with the reason on stderr) where CANN or torch_npu is missing."""
    home = os.environ.get("ASCEND_HOME_PATH")
    if not home:
        return None
    bisheng = shutil.which("bisheng") or os.path.join(home, "compiler", "ccec_compiler", "bin", "bisheng")
    if not os.path.exists(bisheng):
        warnings.warn(f"csrc/ascend: ASCEND_HOME_PATH={home} but no bisheng compiler found; NPU kernel not built")
        return None
    try:
        import torch_npu  # noqa: F401
        from torch_npu.utils.cpp_extension import NpuExtension
    except Exception as e:  # pragma: no cover - needs CANN + torch_npu
        warnings.warn(f"csrc/ascend: torch_npu unavailable ({e}); NPU kernel not built")
        return None
    # 1. bisheng, as compiler and link driver (Huawei's pybind/torch samples build .asc sources with it),
    #    makes a shared library of npu/launch.asc (the device-only kernel files for dav-c220 = A2/A3, their
    #    device binary and the <<<>>> launch stubs);
    # 2. the torch_npu binding (g++) links that library; it is found through the extension's rpath.
    # The same commands, spelled out for a shell, are in bench/npu_check.sh.
    build = os.path.join(ROOT, "build", "ascend")
    os.makedirs(build, exist_ok=True)
    lib = os.path.join(build, "libselattn_npu_kernel.so")
    cmd = [bisheng, "-x", "asc", "--npu-arch=dav-2201", "-O2", "-std=c++17", "-fPIC", "-shared",
           os.path.join(HERE, "npu", "launch.asc"), "-o", lib, "-I" + os.path.join(HERE, "kernel")]
    print("csrc/ascend:", " ".join(cmd), file=sys.stderr)
    subprocess.check_call(cmd)
    return NpuExtension(
        "attention._ascendc_npu",
        sources=[_rel("npu", "npu_binding.cpp")] + HOST_SOURCES,
        include_dirs=[HERE, os.path.join(HERE, "kernel"), os.path.join(HERE, "host"),
                      os.path.join(home, "include"), os.path.join(home, "aarch64-linux", "include"),
                      os.path.join(home, "x86_64-linux", "include")],
        library_dirs=[build, os.path.join(home, "lib64")],
        runtime_library_dirs=[build],
        libraries=["selattn_npu_kernel", "ascendcl", "runtime", "platform", "tiling_api"],
        extra_compile_args=["-O2", "-std=c++20"],
    )


def extensions() -> list:
    exts = [_twin()]
    try:
        npu = _npu()
    except Exception as e:  # a broken CANN install must not break the CPU install
        warnings.warn(f"csrc/ascend: NPU kernel not built: {e}")
        npu = None
    if npu is not None:
        exts.append(npu)
    return exts
