"""The ``ascendc`` backend: the AscendC kernel of csrc/ascend.

Two builds of one kernel source:
- ``attention._ascendc_twin`` (always built): the kernel compiled for the CPU against our twin of the
  AscendC API, with every on-chip buffer checked against a chosen SoC's capacities. It runs on CPU
  tensors; on "cpu" it ranks after the reference, so CPU users still get the reference automatically.
- ``attention._ascendc_npu`` (built only where CANN and torch_npu exist): the same kernel for the chip,
  launched on the current NPU stream. It has never run: no NPU was available while writing it.

The SoC whose capacities and tiling the twin uses: ``ATTENTION_ASCEND_SOC`` (default Ascend910B2), or
``use_soc(name)``. On an NPU the device reports its own SoC.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Dict, List, Optional

import torch

from ...inputs import FLOAT_DTYPES, SelectiveAttentionInputs, dtype_name
from ...registry import ATTENTION_FEATURES, Backend, npu_available

try:
    from ... import _ascendc_twin as _twin  # type: ignore[attr-defined]

    _TWIN_ERROR = None
except Exception as e:  # not built: reported by unavailable_reasons, never an import failure
    _twin = None
    _TWIN_ERROR = f"CPU twin extension attention._ascendc_twin not built ({type(e).__name__}: {e})"

try:
    from ... import _ascendc_npu as _npu  # type: ignore[attr-defined]

    _NPU_ERROR = None
except Exception:
    _npu = None
    _NPU_ERROR = "NPU kernel not built (needs CANN: ASCEND_HOME_PATH and torch_npu at install time)"

DEFAULT_SOC = "Ascend910B2"
#: The SoCs the test suite runs the twin for: two 910B parts, a 910C die and the 310P3.
TEST_SOCS = ("Ascend910B2", "Ascend910B4", "Ascend910_9391", "Ascend310P3")

# (soc, tiling) chosen by use_soc: a context variable, so two threads (or tasks) can run the twin as
# different SoCs at the same time; a new thread starts with the environment's SoC.
_override: contextvars.ContextVar = contextvars.ContextVar("ascendc_soc_override", default=(None, None))


def current_soc() -> str:
    return _override.get()[0] or os.environ.get("ATTENTION_ASCEND_SOC", "").strip() or DEFAULT_SOC


def _tiling_override() -> Optional[Dict[str, int]]:
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
    return _twin.soc_table() if _twin is not None else []


def _soc_info(name: str) -> Optional[dict]:
    return next((s for s in soc_table() if s["name"] == name), None)


def plan(shape: dict, soc: Optional[str] = None, tiling: Optional[Dict[str, int]] = None) -> dict:
    """The tiling the host picks for ``shape`` (keys T, H, Hkv, Dqk, Dr, Dv, K, block_size, dtype,
    separate_v, max_seqlen) on ``soc``; with ``tiling``, that choice checked instead. No kernel runs."""
    if _twin is None:
        raise RuntimeError(_TWIN_ERROR)
    return _twin.plan(soc or current_soc(), shape, tiling)




def _max_seqlen(inp: SelectiveAttentionInputs) -> int:
    """Bound on every sequence length from shapes alone (no read of the lengths): what the binding
    clips block ranges to, so the plan here sees the same candidate count as the launch."""
    if inp.paged:
        return int(inp.block_table.shape[1]) * int(inp.kv.shape[1])
    return int(inp.kv.shape[0])


def _shape_key(inp: SelectiveAttentionInputs) -> tuple:
    return (inp.num_tokens, inp.num_heads, inp.num_kv_heads, inp.head_dim, inp.rope_dim, inp.d_v, inp.topk,
            inp.block_size, dtype_name(inp.dtype), not inp.latent, _max_seqlen(inp))


def _tiling_key():
    tiling = _tiling_override()
    return None if tiling is None else tuple(sorted(tiling.items()))


@functools.lru_cache(maxsize=256)
def _plan_cached(soc: str, key: tuple, tiling: Optional[tuple]) -> dict:
    T, H, Hkv, Dqk, Dr, Dv, K, bs, dt, sep, max_seqlen = key
    shape = dict(T=T, H=H, Hkv=Hkv, Dqk=Dqk, Dr=Dr, Dv=Dv, K=K, block_size=bs, dtype=dt, separate_v=sep,
                 max_seqlen=max_seqlen)
    return _twin.plan(soc, shape, None if tiling is None else dict(tiling))


class AscendCBackend(Backend):
    name = "ascendc"
    description = "AscendC kernel (csrc/ascend): on cpu the CPU twin of the same source; on npu the chip build"
    priorities = {"npu": 10, "cpu": 60}  # first on npu; on cpu (the twin) after the reference
    ops = {"attention": ATTENTION_FEATURES}  # the kernel implements all of SPEC.md section 1
    dtypes = frozenset(FLOAT_DTYPES)  # per SoC narrowed in limit_reasons (no bf16 / fp32 cube on some)

    def unavailable_reasons(self) -> List[str]:
        return [_TWIN_ERROR] if _twin is None and _npu is None else []

    def device_types(self):
        devs = set()
        if _twin is not None:
            devs.add("cpu")
        if _npu is not None:
            devs.add("npu")
        return frozenset(devs) or frozenset(self.priorities)

    def limit_reasons(self, inp: SelectiveAttentionInputs) -> List[str]:
        reasons = []
        dev = inp.device.type
        if dev == "cpu" and _twin is None:
            reasons.append(_TWIN_ERROR)
        if dev == "npu" and _npu is None:
            reasons.append(_NPU_ERROR)
        if dev == "cpu" and _twin is not None:
            soc = current_soc()
            info = _soc_info(soc)
            if info is None:
                reasons.append(f"unknown SoC {soc!r} (ATTENTION_ASCEND_SOC)")
            else:
                if inp.dtype == torch.bfloat16 and not info["bf16"]:
                    reasons.append(f"{soc} has no bfloat16 support in hardware")
                if inp.dtype == torch.float32 and not info["fp32_cube"]:
                    reasons.append(f"{soc}'s cube unit has no float32 Mmad")
                if not reasons:
                    p = _plan_cached(soc, _shape_key(inp), _tiling_key())
                    if not p["fits"]:
                        reasons.append(p["problems"])
        return reasons

    def forward(self, inp: SelectiveAttentionInputs):
        if inp.device.type == "npu":
            return self._forward_npu(inp)
        return self._forward_twin(inp)

    @staticmethod
    def _args(inp: SelectiveAttentionInputs):
        """Contiguous tensors and int32 metadata (the kernel reads raw pointers)."""
        c = lambda x: None if x is None else x.contiguous()  # noqa: E731
        i32 = lambda x: None if x is None else x.to(torch.int32).contiguous()  # noqa: E731
        idx = inp.indices
        if idx.dtype == torch.int64:
            # values outside int32 can only be dropped candidates (position >= any length): map them to -1
            big = (idx > torch.iinfo(torch.int32).max) | (idx < torch.iinfo(torch.int32).min)
            idx = torch.where(big, torch.full_like(idx, -1), idx)
        dev = inp.device
        T = inp.num_tokens
        cu_q = inp.cu_seqlens_q if inp.cu_seqlens_q is not None else torch.tensor([0, T], device=dev)
        cu_k = inp.cu_seqlens_k
        if not inp.paged and cu_k is None:
            cu_k = torch.tensor([0, inp.kv.shape[0]], device=dev)
        return dict(q=c(inp.q), q_rope=c(inp.q_rope), kv=c(inp.kv), kv_rope=c(inp.kv_rope), v=c(inp.v),
                    indices=i32(idx), cu_seqlens_q=i32(cu_q), cu_seqlens_k=i32(cu_k),
                    block_table=i32(inp.block_table), seqlens_k=i32(inp.seqlens_k),
                    attn_sink=None if inp.attn_sink is None else inp.attn_sink.float().contiguous(),
                    sm_scale=float(inp.sm_scale), d_v=int(inp.d_v), block_size=int(inp.block_size),
                    causal=bool(inp.causal))

    def _forward_twin(self, inp: SelectiveAttentionInputs):
        out, lse = self.new_outputs(inp)
        _twin.forward(**self._args(inp), out=out, lse=lse, soc=current_soc(), tiling=_tiling_override())
        return out, lse

    def _forward_npu(self, inp: SelectiveAttentionInputs):  # pragma: no cover - needs an NPU
        out, lse = self.new_outputs(inp)
        _npu.forward(**self._args(inp), out=out, lse=lse)
        return out, lse

    def test_devices(self) -> List[str]:
        devs = []
        if _twin is not None:
            devs.append("cpu")
        if _npu is not None and npu_available():
            devs.append("npu")
        return devs

    def info(self) -> Dict[str, str]:
        lines: Dict[str, str] = {}
        lines["cpu twin"] = "built" if _twin is not None else _TWIN_ERROR
        lines["npu kernel"] = "built (never run by its authors)" if _npu is not None else _NPU_ERROR
        if _npu is not None:
            try:
                lines["npu device report"] = str(_npu.device_soc())  # capacities the NPU tiling uses
            except Exception as e:  # pragma: no cover - needs an NPU
                lines["npu device report"] = f"unavailable ({e})"
        if _twin is None:
            return lines
        lines["twin SoC"] = f"{current_soc()} (ATTENTION_ASCEND_SOC)"
        ds = dict(T=1, H=128, Hkv=1, Dqk=576, Dv=512, K=2048, dtype="bfloat16")
        for s in soc_table():
            shape = dict(ds, dtype="bfloat16" if s["bf16"] else "float16")
            p = _twin.plan(s["name"], shape, None)
            mem = ", ".join(f"{k} {v[0] // 1024}/{v[1] // 1024}K" for k, v in p["memory"].items())
            lines[f"tiling {s['name']}"] = (
                f"DeepSeek H=128 Dqk=576 Dv=512 K=2048 {shape['dtype']}: mTile={p['mTile']} nTile={p['nTile']} "
                f"dkChunk={p['dkChunk']} dvChunk={p['dvChunk']} buffers vec/kv/l0={p['vecBufNum']}/"
                f"{p['kvBufNum']}/{p['l0BufNum']} blocks<= {s['aic']} | {mem}"
                + ("" if p["fits"] else f" | DOES NOT FIT: {p['problems']}"))
        return lines


BACKEND = AscendCBackend()
