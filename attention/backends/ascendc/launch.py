"""Per-device entry points of the ascendc backend: the arguments the native bindings take, the checks
that depend on the build, and the launch. The twin and the NPU build differ only here, as two declared
EntryPoints, never as device tests inside the backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from ...inputs import SelectiveAttentionInputs
from .builds import NPU, TWIN, Build
from .soc import current_soc, plan_for, soc_info, tiling_override


def kernel_args(inp: SelectiveAttentionInputs) -> dict:
    """Contiguous tensors and int32 metadata (the kernel reads raw pointers). Device-side only: nothing
    here reads a tensor back to the host (the default cu_seqlens are built on the inputs' device)."""
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731
    i32 = lambda x: None if x is None else x.to(torch.int32).contiguous()  # noqa: E731
    idx = inp.indices
    if idx.dtype == torch.int64:
        # values outside int32 can only be dropped candidates (position >= any length): map them to -1
        big = (idx > torch.iinfo(torch.int32).max) | (idx < torch.iinfo(torch.int32).min)
        idx = torch.where(big, torch.full_like(idx, -1), idx)
    dev = inp.device
    two = lambda end: torch.arange(2, dtype=torch.int32, device=dev) * end  # noqa: E731 - [0, end], no H2D copy
    cu_q = inp.cu_seqlens_q if inp.cu_seqlens_q is not None else two(inp.num_tokens)
    cu_k = inp.cu_seqlens_k
    if not inp.paged and cu_k is None:
        cu_k = two(inp.kv.shape[0])
    # an int8 kv / v goes with its float32 tile scales; the kernel reads them as [rows, Hkv, tiles] (a
    # strided scale view, e.g. inside FlashMLA-style records, is copied here like every other view)
    return dict(q=c(inp.q), q_rope=c(inp.q_rope), kv=c(inp.kv), kv_rope=c(inp.kv_rope), v=c(inp.v),
                kv_scale=c(inp.kv_scale), v_scale=c(inp.v_scale), scale_block=int(inp.scale_block),
                indices=i32(idx), cu_seqlens_q=i32(cu_q), cu_seqlens_k=i32(cu_k),
                block_table=i32(inp.block_table), seqlens_k=i32(inp.seqlens_k),
                attn_sink=None if inp.attn_sink is None else inp.attn_sink.float().contiguous(),
                sm_scale=float(inp.sm_scale), d_v=int(inp.d_v), block_size=int(inp.block_size),
                causal=bool(inp.causal))


def _twin_limits(inp: SelectiveAttentionInputs) -> List[str]:
    """The chosen SoC's dtypes and capacities (the NPU build has the device's own, checked at launch)."""
    soc = current_soc()
    info = soc_info(soc)
    if info is None:
        return [f"unknown SoC {soc!r} (ATTENTION_ASCEND_SOC)"]
    reasons = []
    if inp.dtype == torch.bfloat16 and not info["bf16"]:
        reasons.append(f"{soc} has no bfloat16 support in hardware")
    if inp.dtype == torch.float32 and not info["fp32_cube"]:
        reasons.append(f"{soc}'s cube unit has no float32 Mmad")
    if not reasons:
        p = plan_for(inp)
        if not p["fits"]:
            reasons.append(p["problems"])
    return reasons


def _twin_forward(inp: SelectiveAttentionInputs, out: torch.Tensor, lse: torch.Tensor) -> None:
    TWIN.module.forward(**kernel_args(inp), out=out, lse=lse, soc=current_soc(), tiling=tiling_override())


def _npu_forward(inp: SelectiveAttentionInputs, out: torch.Tensor, lse: torch.Tensor) -> None:  # pragma: no cover
    NPU.module.forward(**kernel_args(inp), out=out, lse=lse)


@dataclass(frozen=True)
class EntryPoint:
    build: Build
    limit_reasons: Callable[[SelectiveAttentionInputs], List[str]]
    forward: Callable[[SelectiveAttentionInputs, torch.Tensor, torch.Tensor], None]


ENTRY_POINTS: Dict[str, EntryPoint] = {
    TWIN.device: EntryPoint(TWIN, _twin_limits, _twin_forward),
    NPU.device: EntryPoint(NPU, lambda inp: [], _npu_forward),
}
