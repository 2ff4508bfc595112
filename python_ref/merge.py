"""Merging partial attention results over disjoint candidate sets (docs/spec.md section 6).

For parts i of the same query and head, each computed without sink:

    lse = log sum_i exp(lse_i)
    out = sum_i exp(lse_i) out_i / (exp(lse) + exp(sink))      (no sink: / exp(lse))

Parts with lse_i = -inf are empty and contribute nothing, not even a NaN held in their out_i (a
partial output of an empty part is never read, like a dropped candidate's storage). All parts empty:
out = 0, lse = -inf. A NaN lse_i or a NaN in the out_i of a non-empty part propagates to out (and a
NaN lse_i to lse), as a NaN score does in the op.

:func:`merge_attention_states` is the production reference (float32, max-shifted);
:func:`merge_attention_states_dense` is the float64 oracle, evaluated from the formula directly
(no shift: tests keep |lse| far below float64's exp overflow at ~709).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["merge_attention_states", "merge_attention_states_dense"]


def merge_attention_states(outs: Tensor, lses: Tensor, attn_sink: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """outs [N, T, H, Dv], lses [N, T, H] (natural log), attn_sink [H] -> (out [T, H, Dv] outs.dtype,
    lse [T, H] float32). Computes in float32. Arguments are trusted (attention.merge_attention_states
    validates)."""
    o = outs.to(torch.float32)
    lse_i = lses.to(torch.float32)
    N, T, H, Dv = o.shape
    if N == 0:
        return outs.new_zeros(T, H, Dv), lses.new_full((T, H), float("-inf"), dtype=torch.float32)
    m = lse_i.amax(dim=0)  # NaN propagates (amax is NaN-propagating)
    # All parts empty: shift by 0 so that exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
    m_sub = torch.where(m == float("-inf"), 0.0, m)
    w = torch.exp(lse_i - m_sub)  # [N, T, H]; 0 for empty parts, NaN for a NaN lse
    # where, not multiply: an empty part's out may hold anything (NaN-filled, never written).
    kept = torch.where((lse_i > float("-inf"))[..., None], o, 0.0)
    acc = (w[..., None] * kept).sum(dim=0)
    wsum = w.sum(dim=0)
    # "empty" is wsum == 0, not "not wsum > 0": a NaN weight must give a NaN lse, not -inf.
    empty = wsum == 0
    denom = wsum
    if attn_sink is not None:
        denom = denom + torch.exp(attn_sink.to(torch.float32)[None, :] - m_sub)
    denom = torch.where(empty, 1.0, denom)  # acc is 0 there: out = 0
    out = (acc / denom[..., None]).to(outs.dtype)
    lse = torch.where(empty, float("-inf"), m_sub + torch.log(torch.where(empty, 1.0, wsum)))
    return out, lse


def merge_attention_states_dense(outs: Tensor, lses: Tensor, attn_sink: Optional[Tensor] = None,
                                 dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """The oracle: docs/spec.md section 6 evaluated literally in ``dtype`` on the CPU."""
    cpu = torch.device("cpu")
    o = outs.detach().to(cpu, dtype)
    lse_i = lses.detach().to(cpu, dtype)
    e = torch.exp(lse_i)  # [N, T, H]
    empty_part = lse_i == float("-inf")
    contrib = torch.where(empty_part[..., None], torch.zeros((), dtype=dtype), e[..., None] * o)
    num = contrib.sum(dim=0)
    total = e.sum(dim=0)
    lse = torch.log(total)
    denom = total
    if attn_sink is not None:
        denom = denom + torch.exp(attn_sink.detach().to(cpu, dtype))[None, :]
    all_empty = empty_part.all(dim=0) if lse_i.shape[0] else torch.ones(lse.shape, dtype=torch.bool)
    out = torch.where(all_empty[..., None], torch.zeros((), dtype=dtype), num / denom[..., None])
    lse = torch.where(all_empty, float("-inf"), lse)
    return out, lse
