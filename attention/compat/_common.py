"""Pieces shared by the vendor shims: argument checks and the per-row max logit.

The shims translate a vendor's layouts and conventions into one call of
``attention.selective_attention``; nothing here computes attention itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import importlib

# The module, not the function of the same name that python_ref re-exports.
_ref = importlib.import_module("python_ref.selective_attention")


def need_tensor(name: str, x, optional: bool = False) -> None:
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def need_rank(name: str, x: Tensor, rank: int, what: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must be {what} ({rank} dimensions), got shape {tuple(x.shape)}")


def need_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def need_int_tensor(name: str, x: Tensor, rank: int, what: str) -> None:
    need_tensor(name, x)
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {str(x.dtype).replace('torch.', '')}")
    need_rank(name, x, rank, what)


def selection_backend_for(ops, backend: Optional[str]) -> dict:
    """``{op: backend or None}`` for the selection ops one vendor call runs, given the one ``backend``
    name its caller passed.

    A selection backend implements only some ops (Triton: the indexer and the fused select; CUDA:
    top-k only), while a vendor call may chain several (``npu_lightning_indexer(return_value=True)``:
    ``lightning_indexer`` then ``topk_indices``). The name goes to the ops its backend implements and
    the others choose automatically, instead of forwarding it where it can only fail. A name no
    selection backend has, or one whose backend implements none of ``ops``, is a ValueError.
    """
    if backend is None:
        return {op: None for op in ops}
    from ..selection import selection_backends

    by_name = {b.name: b for b in selection_backends()}
    if backend not in by_name:
        raise ValueError(f"backend must be None or a selection backend {sorted(by_name)}, got {backend!r}")
    has = by_name[backend].ops
    if not any(op in has for op in ops):
        raise ValueError(f"backend {backend!r} implements {sorted(has)}, none of the ops this call runs "
                         f"({', '.join(ops)})")
    return {op: backend if op in has else None for op in ops}


def max_logits(
    q: Tensor, kv: Tensor, indices: Tensor, *, q_rope: Optional[Tensor] = None, kv_rope: Optional[Tensor] = None,
    sm_scale: Optional[float] = None, block_size: int = 1, cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
    causal: bool = False,
) -> Tensor:
    """max over kept candidates of the scaled logit s_p (SPEC section 1), [T, H] float32; -inf if none kept.

    No backend returns the row max (the contract returns lse only), so this runs the reference's own
    candidate selection and scoring (python_ref's chunked gather: the same keep rules, one
    implementation of them) a second time, on whatever device the inputs are on. It costs about as
    much as a reference forward pass, which is why callers only pay for it when the vendor API
    returns the max (FlashMLA's max_logits, torch_npu's softmax_max).
    """
    # Arguments were already validated by the selective_attention call that precedes this one.
    call = _ref._Call(q, kv, indices, None, None, q_rope, kv_rope, sm_scale, block_size, cu_seqlens_q,
                      cu_seqlens_k, block_table, seqlens_k, causal, None, 0, None)
    T, H = q.shape[0], q.shape[1]
    if call.n == 0 or T == 0:
        return torch.full((T, H), float("-inf"), device=q.device, dtype=torch.float32)
    chunk = _ref.tokens_per_chunk(H, call.Hkv, call.n, call.Dqk + call.Dr)
    parts = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        s = _ref._chunk_scores(call, q, q_rope, indices, c0, c1)["s"]  # [c*Hkv, Hg, n], dropped = -inf
        parts.append(s.amax(dim=-1).reshape(c1 - c0, H).to(torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
