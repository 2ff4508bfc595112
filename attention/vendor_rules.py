"""The pass rules other vendors' test suites apply to attention outputs, reimplemented from their
published definitions (not copied), so ``python -m attention.verify`` can report the numbers a team
moving a model from those stacks would look at.

* FlashMLA (deepseek-ai/FlashMLA, ``tests/``: the ``cal_diff`` helper of its decode and sparse
  tests): the *cosine difference* ``1 - 2 * sum(x*y) / sum(x*x + y*y)`` in float64 over the whole
  tensor (the denominator floored at 1e-12). 0 for identical tensors, 1 when one is zero, 2 for
  x = -y; where both are all zero we return 0 (the literal formula gives 1). Its tests accept below 1e-5 (dense decode) and 5e-6 / 7e-6 in the sparse ones.
* CANN (Huawei ops-transformer, ``attention/sparse_flash_attention/tests/pytest/
  result_compare_method.py``, ``check_result``): both tensors cast to float32, an element passes
  when ``|x - golden| <= atol + rtol * |golden|`` (NaN matches NaN, an infinity matches the same
  infinity), with rtol 2^-7 and atol 1e-4 when the output is bfloat16 and rtol 0.005, atol 2.5e-5
  otherwise; the case passes when at least 99.5% of the elements pass. CANN also fails a case whose
  worst failing element has ``|x - golden| / max(|x|, |golden|, 2^-14 / 0.005)`` >= 10; that
  clause can never fire (``|x - golden| <= 2 * max(|x|, |golden|)``), so it is left out here.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

FLASHMLA_COS_DIFF_LIMIT = 1e-5  # FlashMLA's dense-decode threshold (its sparse tests use 5e-6 / 7e-6)

CANN_PASS_PERCENT = 99.5
# (rtol, atol) by output dtype; every dtype other than bfloat16 gets the default pair.
CANN_TOLERANCES = {torch.bfloat16: (2.0 ** -7, 1e-4)}
CANN_DEFAULT_TOLERANCE = (0.005, 2.5e-5)


def cosine_diff(x: torch.Tensor, ref: torch.Tensor) -> float:
    """FlashMLA's cosine difference of ``x`` against ``ref`` (float64; NaN if either holds NaN)."""
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"cosine_diff: shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    x = x.detach().to("cpu", torch.float64)
    y = ref.detach().to("cpu", torch.float64)
    num = float((x * y).sum())
    den = float((x * x + y * y).sum())
    if math.isnan(num) or math.isnan(den):
        return float("nan")
    if den == 0.0:
        # Both all zero (e.g. every row empty): identical tensors. FlashMLA's literal formula gives 1
        # here (its tests never compare zero outputs); we report the difference, 0.
        return 0.0
    return 1.0 - 2.0 * num / max(den, 1e-12)


def cann_check_result(x: torch.Tensor, golden: torch.Tensor) -> Tuple[bool, float]:
    """CANN's ``check_result`` of output ``x`` against ``golden``: (passed, percent of elements within
    tolerance). The tolerance pair is chosen by ``x``'s dtype, as CANN chooses it by the NPU output's."""
    if tuple(x.shape) != tuple(golden.shape):
        return False, 0.0
    rtol, atol = CANN_TOLERANCES.get(x.dtype, CANN_DEFAULT_TOLERANCE)
    a = x.detach().to("cpu", torch.float32).flatten()
    b = golden.detach().to("cpu", torch.float32).flatten()
    if a.numel() == 0:
        return True, 100.0
    close = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    percent = 100.0 * float(close.sum()) / a.numel()
    return percent >= CANN_PASS_PERCENT, percent
