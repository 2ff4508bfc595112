"""The documented Python entry points."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .arguments import ARG_INDEX, ARG_NAMES, DIFFERENTIABLE
from .inputs import validate
from .ops import run_backend, selective_attention_op

_DIFFERENTIABLE_AT = tuple(ARG_INDEX[n] for n in DIFFERENTIABLE)


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
    # The op's arguments in the schema's order, read off this signature by the argument table's names
    # (tests/test_op.py checks that the signature and the table agree).
    args = tuple(map(locals().__getitem__, ARG_NAMES))
    if _plain_eager_call(args):
        # Same kernel, without the dispatcher + autograd wrapper round trip (~25 us on our CPUs):
        # nothing needs a gradient and nothing traces or intercepts the call.
        out, lse = run_backend(validate(*args))
    else:
        out, lse = selective_attention_op(*args)
    return (out, lse) if return_lse else out


def _plain_eager_call(args: tuple) -> bool:
    if torch.compiler.is_compiling():  # first: dynamo folds it to a constant
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for i in _DIFFERENTIABLE_AT:
        t = args[i]
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            continue  # not a tensor at all: the validator raises a TypeError naming it
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True
