"""The documented Python entry points."""

from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

import python_ref

from .arguments import ARG_NAMES
from .inputs import FLOAT_DTYPES, QUANT_DTYPES, dtype_name, need_int, need_tensor, validate
from .ops import plain_eager_call, run_backend, selective_attention_op

_schema_order = operator.itemgetter(*ARG_NAMES)  # locals() -> the arguments in the schema's order


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
    kv_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scale_block: int = 128,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention of each query token over the kv positions that ``indices`` selects.

    q [T, H, Dqk]; kv [S, Hkv, Dqk] (contiguous, with ``cu_seqlens_k``) or [P, page, Hkv, Dqk]
    (paged, with ``block_table`` and ``seqlens_k``); indices [T, Hkv or 1, K] int32/int64. Without
    ``v`` the value is ``kv[..., :d_v]`` (MLA latent mode). Returns out [T, H, Dv] in q's dtype, and
    lse [T, H] float32 (natural log) with ``return_lse=True``. See docs/spec.md section 1 / docs/contract.md.

    ``kv`` (and ``v``) may be stored quantized, float8_e4m3fn or int8, with ``kv_scale`` (``v_scale``):
    float32 [kv's leading shape, ceil(D / scale_block)], value = stored * scale of its tile (make them
    with :func:`quantize_kv`). No gradient flows to a quantized kv / v.
    """
    # The op's arguments in the schema's order, read off this signature by the argument table's names
    # (tests/test_op.py checks that the signature and the table agree).
    if torch.compiler.is_compiling():  # dynamo folds this to a constant, and traces the op
        out, lse = selective_attention_op(*map(locals().__getitem__, ARG_NAMES))  # (no itemgetter in dynamo)
    else:
        args = _schema_order(locals())
        if plain_eager_call(args):
            # Same kernel, without the dispatcher + autograd wrapper round trip (~25 us on our CPUs):
            # nothing needs a gradient and nothing intercepts the call.
            out, lse = run_backend(validate(*args))
        else:
            out, lse = selective_attention_op(*args)
    return (out, lse) if return_lse else out


def quantize_kv(kv: Tensor, dtype: torch.dtype, scale_block: int = 128) -> Tuple[Tensor, Tensor]:
    """``(kv_q, kv_scale)`` of a float cache (or v) for ``selective_attention(kv=kv_q, kv_scale=kv_scale)``.

    ``dtype`` is ``torch.float8_e4m3fn`` or ``torch.int8``. kv_q has kv's shape; kv_scale is float32
    [kv.shape[:-1], ceil(D / scale_block)]. Per row and tile of ``scale_block`` columns: scale =
    amax / 448 (e4m3) or amax / 127 (int8), 1 for an all-zero tile; stored = x / scale rounded to
    nearest (ties to even) and saturated (docs/contract.md "Quantized caches"). Any leading shape
    ([S, Hkv, D], paged [P, page, Hkv, D], or the rows being appended) and any device.
    """
    need_tensor("kv", kv)
    if kv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"kv must be float32, float16 or bfloat16, got {dtype_name(kv.dtype)}")
    if kv.dim() < 1:
        raise ValueError("kv must have at least one dimension (the row's columns)")
    if dtype not in QUANT_DTYPES:
        raise TypeError(f"dtype must be one of {[dtype_name(d) for d in QUANT_DTYPES]}, got {dtype!r}")
    need_int("scale_block", scale_block, lo=1)
    return python_ref.quantize_kv(kv, dtype, scale_block)
