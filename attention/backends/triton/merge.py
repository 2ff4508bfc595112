"""Triton merge of partial attention results (docs/spec.md section 6): the split-K combine as a reusable piece.

``merge_states_tile`` is a ``@triton.jit`` function that any kernel can call for one (token, head
block, value-column block) tile; ``merge_attention_states_kernel`` is the stand-alone kernel around
it and :func:`merge_attention_states` its launcher. It computes the same thing as
``selective_attention_combine_kernel`` in kernels.py (which weights the splits of one call by
``exp2(lse2)``) so the split-K path can call this tile with ``LSE_BASE2=True``: partial LSEs in
base 2 (what the forward kernel keeps), merged LSE always returned in natural log.

Semantics beyond the combine kernel's (so that a NaN part behaves as a NaN score in the op):
- a part is *empty* when its lse is -inf; its out is never read (masked load), whatever it holds;
- "all parts empty" is tested as ``wsum == 0``, so a NaN lse gives NaN out and NaN lse (the combine
  kernel's ``wsum > 0`` test would turn the lse into -inf);
- two passes over the part LSEs (max, then weights) keep the sum in a fixed part order: deterministic.

Host side: strides of every tensor are passed through (views, expanded sink, gathered [N, T, H, Dv]
buffers all work without copies); no device data is read.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ...inputs import new_empty as _new
from .jit_common import JIT_LN2, JIT_LOG2E


@triton.jit
def merge_states_tile(
    OPART, LPART, SINK, t, offs_h, h_mask, offs_dv, dv_mask, num_parts,
    stride_ops, stride_opt, stride_oph, stride_opd,
    stride_lps, stride_lpt, stride_lph, stride_sink,
    HAS_SINK: tl.constexpr, LSE_BASE2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merged (out [BLOCK_H, BLOCK_DV] float32, lse [BLOCK_H] natural log) of token t's parts.

    Works in base 2 internally (exp2/log2 are the fast instructions); natural-log part LSEs are
    converted on load.
    """
    t64 = t.to(tl.int64)
    # Pointers advanced part by part (64-bit pointer arithmetic): i * stride_ops in int32 would wrap
    # once parts * T * H * Dv passes 2**31 elements.
    lp0 = LPART + t64 * stride_lpt + offs_h * stride_lph
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    lp = lp0
    for i in range(0, num_parts):
        l2 = tl.load(lp, mask=h_mask, other=float("-inf")).to(tl.float32)
        if not LSE_BASE2:
            l2 = l2 * JIT_LOG2E
        # NaN-propagating max: a NaN part must poison the merge, as NaN does in the float64 formula.
        m = tl.where((l2 != l2) | (l2 > m), l2, m)
        lp += stride_lps
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    wsum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    lp = lp0
    op = OPART + t64 * stride_opt + offs_h[:, None] * stride_oph + offs_dv[None, :] * stride_opd
    for i in range(0, num_parts):
        l2 = tl.load(lp, mask=h_mask, other=float("-inf")).to(tl.float32)
        if not LSE_BASE2:
            l2 = l2 * JIT_LOG2E
        w = tl.exp2(l2 - m_sub)
        # Masked on the part's emptiness: an empty part's output is never read (may be NaN-filled).
        o = tl.load(op, mask=h_mask[:, None] & dv_mask[None, :] & (l2 > float("-inf"))[:, None], other=0.0)
        wsum += w
        acc += w[:, None] * o.to(tl.float32)
        lp += stride_lps
        op += stride_ops
    empty = wsum == 0.0
    denom = wsum
    if HAS_SINK:
        sink2 = tl.load(SINK + offs_h * stride_sink, mask=h_mask, other=0.0).to(tl.float32) * JIT_LOG2E
        denom = denom + tl.exp2(sink2 - m_sub)
    denom = tl.where(empty, 1.0, denom)  # acc is 0 there: out = 0
    out = acc / denom[:, None]
    lse = tl.where(empty, float("-inf"), (m_sub + tl.log2(tl.where(empty, 1.0, wsum))) * JIT_LN2)
    return out, lse


@triton.jit
def merge_attention_states_kernel(
    OPART, LPART, SINK, OUT, LSE, H, num_parts,
    stride_ops, stride_opt, stride_oph, stride_opd,
    stride_lps, stride_lpt, stride_lph, stride_sink,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    DV: tl.constexpr, HAS_SINK: tl.constexpr, LSE_BASE2: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    out, lse = merge_states_tile(
        OPART, LPART, SINK, t, offs_h, h_mask, offs_dv, dv_mask, num_parts,
        stride_ops, stride_opt, stride_oph, stride_opd, stride_lps, stride_lpt, stride_lph, stride_sink,
        HAS_SINK=HAS_SINK, LSE_BASE2=LSE_BASE2, BLOCK_H=BLOCK_H, BLOCK_DV=BLOCK_DV)
    t64 = t.to(tl.int64)
    tl.store(OUT + t64 * stride_ot + offs_h[:, None] * stride_oh + offs_dv[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=h_mask[:, None] & dv_mask[None, :])
    # Only the first value-column block writes the lse (every block computed the same one).
    tl.store(LSE + t64 * stride_lt + offs_h * stride_lh, lse, mask=h_mask & ((offs_h * 0 + tl.program_id(2)) == 0))


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def launch_merge(outs: torch.Tensor, lses: torch.Tensor, attn_sink: Optional[torch.Tensor], out: torch.Tensor,
                 lse: torch.Tensor, lse_base2: bool = False) -> None:
    """Write the merge of outs [N, T, H, Dv] / lses [N, T, H] into out [T, H, Dv] / lse [T, H] (any strides)."""
    N, T, H, Dv = outs.shape
    if T == 0 or H == 0:
        return
    bh = min(16, _p2(H))
    bdv = min(128, max(16, _p2(Dv))) if Dv else 16
    grid = (T, triton.cdiv(H, bh), max(1, triton.cdiv(Dv, bdv)))
    sink = attn_sink if attn_sink is not None else lses
    merge_attention_states_kernel[grid](
        outs, lses, sink, out, lse, H, N,
        *outs.stride(), *lses.stride(), attn_sink.stride(0) if attn_sink is not None else 0,
        *out.stride(), *lse.stride(),
        DV=Dv, HAS_SINK=attn_sink is not None, LSE_BASE2=lse_base2, BLOCK_H=bh, BLOCK_DV=bdv,
    )


def merge_attention_states(outs: torch.Tensor, lses: torch.Tensor, attn_sink: Optional[torch.Tensor] = None,
                           out: Optional[torch.Tensor] = None,
                           lse: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton merge (validated inputs): returns (out [T, H, Dv] outs.dtype, lse [T, H] float32)."""
    N, T, H, Dv = outs.shape
    # NaN-filled under ATTENTION_NAN_FILL=1 (tests): an element the kernel forgets cannot pass.
    if out is None:
        out = _new(T, H, Dv, device=outs.device, dtype=outs.dtype)
    if lse is None:
        lse = _new(T, H, device=outs.device, dtype=torch.float32)
    if N == 0:  # no part at all: everything empty (a zero-trip kernel loop would give the same)
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    launch_merge(outs, lses, attn_sink, out, lse)
    return out, lse
