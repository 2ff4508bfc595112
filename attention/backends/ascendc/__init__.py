"""The ``ascendc`` backend: the AscendC kernel of csrc/ascend.

Two builds of one kernel source (builds.py), each with its declared entry point (launch.py); the backend
declaration is backend.py, the twin's SoC choice and the host tiling soc.py:
- ``attention._ascendc_twin`` (always built): the kernel compiled for the CPU against our twin of the
  AscendC API, with every on-chip buffer checked against a chosen SoC's capacities. It runs on CPU
  tensors; on "cpu" it ranks after the reference, so CPU users still get the reference automatically.
- ``attention._ascendc_npu`` (built only where CANN and torch_npu exist): the same kernel for the chip,
  launched on the current NPU stream. It has never run: no NPU was available while writing it.

The SoC whose capacities and tiling the twin uses: ``ATTENTION_ASCEND_SOC`` (default Ascend910B2), or
``use_soc(name)``. On an NPU the device reports its own SoC.
"""

from __future__ import annotations

from .backend import BACKEND, AscendCBackend  # noqa: F401
from .builds import NPU, TWIN, Build  # noqa: F401
from .launch import ENTRY_POINTS, kernel_args  # noqa: F401
from .soc import DEFAULT_SOC, TEST_SOCS, current_soc, plan, soc_table, use_soc  # noqa: F401

# the native modules themselves (None when not built) and why they are missing
_twin, _TWIN_ERROR = TWIN.module, TWIN.error
_npu, _NPU_ERROR = NPU.module, NPU.error

__all__ = ["BACKEND", "AscendCBackend", "DEFAULT_SOC", "TEST_SOCS", "current_soc", "plan", "soc_table", "use_soc"]
