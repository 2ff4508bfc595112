"""The SoC the CPU twin runs as, and the host tiling for a shape (csrc/ascend/host/tiling.cpp)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Dict, List, Optional


from ...inputs import SelectiveAttentionInputs, dtype_name
from .builds import TWIN

DEFAULT_SOC = "Ascend910B2"
#: The SoCs the test suite runs the twin for: two 910B parts, a 910C die and the 310P3.
TEST_SOCS = ("Ascend910B2", "Ascend910B4", "Ascend910_9391", "Ascend310P3")

# (soc, tiling) chosen by use_soc: a context variable, so two threads (or tasks) can run the twin as
# different SoCs at the same time; a new thread starts with the environment's SoC.
_override: contextvars.ContextVar = contextvars.ContextVar("ascendc_soc_override", default=(None, None))


def current_soc() -> str:
    return _override.get()[0] or os.environ.get("ATTENTION_ASCEND_SOC", "").strip() or DEFAULT_SOC


def tiling_override() -> Optional[Dict[str, int]]:
    return _override.get()[1]


@contextlib.contextmanager
def use_soc(name: str, tiling: Optional[Dict[str, int]] = None):
    """Run the twin as ``name`` (and optionally force tile sizes) inside the block (this thread only)."""
    token = _override.set((name, tiling))
    try:
        yield
    finally:
        _override.reset(token)


def soc_table() -> List[dict]:
    return TWIN.module.soc_table() if TWIN.built else []


def soc_info(name: str) -> Optional[dict]:
    return next((s for s in soc_table() if s["name"] == name), None)


def plan(shape: dict, soc: Optional[str] = None, tiling: Optional[Dict[str, int]] = None) -> dict:
    """The tiling the host picks for ``shape`` (keys T, H, Hkv, Dqk, Dr, Dv, K, block_size, dtype,
    separate_v, max_seqlen, kv_int8, v_int8, scale_block) on ``soc``; with ``tiling``, that choice checked instead. No kernel runs."""
    if not TWIN.built:
        raise RuntimeError(TWIN.error)
    return TWIN.module.plan(soc or current_soc(), shape, tiling)




def _max_seqlen(inp: SelectiveAttentionInputs) -> int:
    """Bound on every sequence length from shapes alone (no read of the lengths): what the binding
    clips block ranges to, so the plan here sees the same candidate count as the launch."""
    if inp.paged:
        return int(inp.block_table.shape[1]) * int(inp.kv.shape[1])
    return int(inp.kv.shape[0])


def _shape_key(inp: SelectiveAttentionInputs) -> tuple:
    return (inp.num_tokens, inp.num_heads, inp.num_kv_heads, inp.head_dim, inp.rope_dim, inp.d_v, inp.topk,
            inp.block_size, dtype_name(inp.dtype), not inp.latent, _max_seqlen(inp), inp.kv_quantized,
            inp.v_quantized, inp.scale_block)


@functools.lru_cache(maxsize=256)
def _plan_cached(soc: str, key: tuple, tiling: Optional[tuple]) -> dict:
    T, H, Hkv, Dqk, Dr, Dv, K, bs, dt, sep, max_seqlen, kv_int8, v_int8, scale_block = key
    shape = dict(T=T, H=H, Hkv=Hkv, Dqk=Dqk, Dr=Dr, Dv=Dv, K=K, block_size=bs, dtype=dt, separate_v=sep,
                 max_seqlen=max_seqlen, kv_int8=kv_int8, v_int8=v_int8, scale_block=scale_block)
    return TWIN.module.plan(soc, shape, None if tiling is None else dict(tiling))


def plan_for(inp: SelectiveAttentionInputs) -> dict:
    """The (cached) plan of these inputs on the current SoC with the current tiling override."""
    tiling = tiling_override()
    return _plan_cached(current_soc(), _shape_key(inp), None if tiling is None else tuple(sorted(tiling.items())))
