"""The two native builds of the one kernel source, declared as data (which device each serves, the
module, why it is missing). Importing never fails: a build that is not there is reported by the backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

try:
    from ... import _ascendc_twin as _twin_module  # type: ignore[attr-defined]

    _twin_error = None
except Exception as e:  # not built: reported by unavailable_reasons, never an import failure
    _twin_module = None
    _twin_error = f"CPU twin extension attention._ascendc_twin not built ({type(e).__name__}: {e})"

try:
    from ... import _ascendc_npu as _npu_module  # type: ignore[attr-defined]

    _npu_error = None
except Exception:
    _npu_module = None
    _npu_error = "NPU kernel not built (needs CANN: ASCEND_HOME_PATH and torch_npu at install time)"


@dataclass(frozen=True)
class Build:
    """One compiled form of csrc/ascend/kernel."""

    device: str  # the torch device type whose tensors it takes
    module: Optional[object]  # the pybind11 module, None when not built
    error: Optional[str]  # why it is not built
    label: str  # for attention.info

    @property
    def built(self) -> bool:
        return self.module is not None


#: the kernel compiled for the CPU against csrc/ascend/twin, run on CPU tensors with a chosen SoC's limits
TWIN = Build("cpu", _twin_module, _twin_error, "cpu twin")
#: the kernel compiled by bisheng for A2/A3, launched on the NPU of its inputs (never run by its authors)
NPU = Build("npu", _npu_module, _npu_error, "npu kernel")
