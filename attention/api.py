"""The documented Python entry points."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .ops import _impl, selective_attention_op


def selective_attention(
    q: Tensor,
    kv: Tensor,
    indices: Tensor,
    *,
    v: Optional[Tensor] = None,
    d_v: Optional[int] = None,
    q_rope: Optional[Tensor] = None,
    kv_rope: Optional[Tensor] = None,
    sm_scale: Optional[float] = None,
    block_size: int = 1,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    seqlens_k: Optional[Tensor] = None,
    causal: bool = False,
    attn_sink: Optional[Tensor] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention of each query token over the kv positions that ``indices`` selects.

    q [T, H, Dqk]; kv [S, Hkv, Dqk] (contiguous, with ``cu_seqlens_k``) or [P, page, Hkv, Dqk]
    (paged, with ``block_table`` and ``seqlens_k``); indices [T, Hkv or 1, K] int32/int64. Without
    ``v`` the value is ``kv[..., :d_v]`` (MLA latent mode). Returns out [T, H, Dv] in q's dtype, and
    lse [T, H] float32 (natural log) with ``return_lse=True``. See SPEC.md section 1 / docs/contract.md.
    """
    args = (q, kv, indices, v, d_v, q_rope, kv_rope, sm_scale, block_size, cu_seqlens_q, cu_seqlens_k,
            block_table, seqlens_k, causal, attn_sink, backend)
    if _plain_eager_call(q, kv, v, q_rope, kv_rope, attn_sink):
        # Same kernel, without the dispatcher + autograd wrapper round trip (~25 us on our CPUs):
        # nothing needs a gradient and nothing traces or intercepts the call.
        out, lse = _impl(*args)
    else:
        out, lse = selective_attention_op(*args)
    return (out, lse) if return_lse else out


def _plain_eager_call(*tensors) -> bool:
    if torch.compiler.is_compiling():  # first: dynamo folds it to a constant
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            continue  # not a tensor at all: the validator raises a TypeError naming it
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True
