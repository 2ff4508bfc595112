"""FlashMLA's Python API on top of ``attention.selective_attention``.

Model code written against ``flash_mla`` (deepseek-ai/FlashMLA, ``flash_mla/flash_mla_interface.py``)
can import these three functions instead and run on every backend of this package::

    from attention.compat.flash_mla import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata

Conventions kept from FlashMLA (docstring of ``flash_mla_interface.py`` and ``tests/ref.py``): natural-log
LSE; a query row with no valid index returns out = 0, lse = +inf and max_logits = -inf; the attention
sink scales the output only (lse and max_logits ignore it); decode LSE is laid out [b, h_q, s_q].
Restrictions dropped: any head count, any kv head count dividing it, any top-k, any d_v <= d_qk, any
float dtype, a bf16 (or fp16/fp32) cache on the sparse decode path besides FlashMLA's FP8 one.
docs/migration.md lists every difference.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..api import quantize_kv, selective_attention
from ..inputs import dtype_name
from ._common import max_logits as _max_logits
from ._common import need_int_tensor, need_rank, need_tensor

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd",
           "pack_fp8_kvcache", "unpack_fp8_kvcache", "quantize_fp8_kvcache", "unpack_model1_fp8_kvcache"]


def _lonely_to_inf(lse: Tensor) -> Tensor:
    """Our contract says lse = -inf for a row with nothing kept; FlashMLA returns +inf there
    (tests/ref.py: ``lse[lonely_q_mask] = +inf``), so that exp(-lse) = 0 in a later merge."""
    return lse.masked_fill(lse == float("-inf"), float("inf"))


# ----------------------------------------------------------------------------------------------
# Scheduler metadata
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FlashMLASchedMeta:
    """Stand-in for FlashMLA's tile-scheduler metadata: this package needs no schedule, but it keeps
    FlashMLA's rule that one metadata object is reused only across calls of the same shapes, so code
    that breaks that rule fails here as it would on FlashMLA."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]
        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[Tensor] = None  # always None here: kept for attribute access
    num_splits: Optional[Tensor] = None


def get_mla_metadata(*args, **kwargs) -> Tuple[FlashMLASchedMeta, None]:
    """FlashMLA's current ``get_mla_metadata``: arguments are accepted and ignored (the old
    interface passed cache_seqlens, num_q_tokens_per_head_k, h_kv, h_q, is_fp8, topk), and it
    returns ``(FlashMLASchedMeta(), None)``; only the first element is used."""
    return FlashMLASchedMeta(), None


def _check_sched_meta(meta, config: "FlashMLASchedMeta.Config") -> None:
    if not isinstance(meta, FlashMLASchedMeta):
        # A real flash_mla metadata object (or the old (tensor, tensor) pair) carries a GPU schedule
        # we do not use; accept it so mixed code keeps running.
        return
    if not meta.have_initialized:
        meta.have_initialized = True
        meta.config = config
        return
    old = meta.config
    for f in dataclasses.fields(config):
        a, b = getattr(old, f.name), getattr(config, f.name)
        if a != b:
            raise ValueError(
                f"tile_scheduler_metadata was first used with {f.name}={a!r}, now {f.name}={b!r}: FlashMLA "
                f"allows reusing one metadata object only across calls with the same shapes and flags "
                f"(get a new one from get_mla_metadata())")


# ----------------------------------------------------------------------------------------------
# Sparse prefill
# ----------------------------------------------------------------------------------------------

def flash_mla_sparse_fwd(
    q: Tensor,
    kv: Tensor,
    indices: Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[Tensor] = None,
    topk_length: Optional[Tensor] = None,
    indexer_topk: int = 0,
    *,
    compute_max_logits: bool = True,
    backend: Optional[str] = None,
):
    """Sparse MLA prefill: q [s_q, h_q, d_qk], kv [s_kv, h_kv, d_qk], indices [s_q, h_kv, topk].

    Index j of row i is valid when 0 <= indices[i, g, j] < s_kv (and j < topk_length[i] when given).
    Returns ``(out [s_q, h_q, d_v] q.dtype, max_logits [s_q, h_q] float32, lse [s_q, h_q] float32)``, and
    ``lse_indexer`` as a fourth element when ``indexer_topk > 0`` (LSE over the first indexer_topk
    entries of each row). ``max_logits`` costs a second (reference-path) pass over the selected rows;
    ``compute_max_logits=False`` skips it and returns None in its place.
    """
    for name, x in (("q", q), ("kv", kv), ("indices", indices)):
        need_tensor(name, x)
    need_rank("q", q, 3, "[s_q, h_q, d_qk]")
    need_rank("kv", kv, 3, "[s_kv, h_kv, d_qk]")
    need_rank("indices", indices, 3, "[s_q, h_kv, topk]")
    if isinstance(indexer_topk, bool) or not isinstance(indexer_topk, int) or indexer_topk < 0:
        raise ValueError(f"indexer_topk must be an int >= 0, got {indexer_topk!r}")
    if indexer_topk > indices.shape[-1]:
        raise ValueError(f"indexer_topk must be <= topk={indices.shape[-1]}, got {indexer_topk}")
    if topk_length is not None:
        need_int_tensor("topk_length", topk_length, 1, "[s_q]")
        if topk_length.shape[0] != q.shape[0]:
            raise ValueError(f"topk_length must have s_q={q.shape[0]} entries, got shape {tuple(topk_length.shape)}")
        # Entries at or past topk_length[i] are ignored: mark them invalid (device op, no sync).
        j = torch.arange(indices.shape[-1], device=indices.device)
        indices = torch.where(j < topk_length.to(indices.device)[:, None, None], indices, -1).to(indices.dtype)

    common = dict(sm_scale=sm_scale, backend=backend)
    out, lse = selective_attention(q, kv, indices, d_v=d_v, attn_sink=attn_sink, return_lse=True, **common)
    mx = None
    if compute_max_logits:
        with torch.no_grad():  # a statistic: no gradient flows through the row max
            mx = _max_logits(q, kv, indices, sm_scale=float(sm_scale))
    result = (out, mx, _lonely_to_inf(lse))
    if indexer_topk > 0:
        # FlashMLA computes this inside the same kernel; here it is a second call on the prefix.
        _, lse_idx = selective_attention(q, kv, indices[..., :indexer_topk].contiguous(), d_v=d_v,
                                         return_lse=True, **common)
        result = result + (_lonely_to_inf(lse_idx),)
    return result


# ----------------------------------------------------------------------------------------------
# Decode with a kv cache (sparse or dense)
# ----------------------------------------------------------------------------------------------

def flash_mla_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    block_table: Optional[Tensor],
    cache_seqlens: Optional[Tensor],
    head_dim_v: int,
    tile_scheduler_metadata=None,
    num_splits=None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[Tensor] = None,
    attn_sink: Optional[Tensor] = None,
    extra_k_cache: Optional[Tensor] = None,
    extra_indices_in_kvcache: Optional[Tensor] = None,
    topk_length: Optional[Tensor] = None,
    extra_topk_length: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """MLA decode: q [b, s_q, h_q, d], k_cache [num_blocks, page_block_size, h_k, d].

    Sparse path (``indices`` [b, s_q, topk] given): each index is a flat cache slot,
    ``page * page_block_size + offset``; -1 (any negative, or >= num_blocks * page_block_size) is
    invalid; ``block_table``/``cache_seqlens`` are not needed. Dense path: every position below
    ``cache_seqlens[i]`` of sequence i through ``block_table``, ``causal`` bottom-right aligned.
    Returns ``(out [b, s_q, h_q, head_dim_v] q.dtype, lse [b, h_q, s_q] float32)``.
    ``num_splits`` is ignored (FlashMLA requires None; the old interface passed a tensor).
    ``is_fp8_kvcache=True`` (sparse path only) reads FlashMLA's FP8 caches natively: V3.2,
    [num_blocks, page_block_size, 1, 656] bytes per token (q's head_dim 576), and MODEL1, 584 bytes per
    token (head_dim 512): the records are viewed as the op's (kv, kv_scale, kv_rope) arguments
    (``unpack_fp8_kvcache`` / ``unpack_model1_fp8_kvcache``), and the backend dequantizes what it selects.
    """
    need_tensor("q", q)
    need_tensor("k_cache", k_cache)
    need_rank("q", q, 4, "[batch_size, seq_len_q, num_heads_q, head_dim]")
    need_rank("k_cache", k_cache, 4, "[num_blocks, page_block_size, num_heads_k, head_dim]")
    b, s_q, h_q, d = q.shape
    if is_fp8_kvcache and indices is None:
        raise ValueError("is_fp8_kvcache=True needs indices (FlashMLA's FP8 cache is a sparse-decode format); "
                         "the dense path takes a bfloat16 cache")
    if softmax_scale is None:
        softmax_scale = d ** -0.5  # FlashMLA: 1/sqrt(head_dim of q), rope columns included
    topk = None if indices is None else indices.shape[-1]
    extra_topk = None if extra_indices_in_kvcache is None else extra_indices_in_kvcache.shape[-1]
    config = FlashMLASchedMeta.Config(
        b, s_q, h_q, k_cache.shape[1], k_cache.shape[2], bool(causal), bool(is_fp8_kvcache), topk,
        None if extra_k_cache is None else extra_k_cache.shape[1], extra_topk)
    _check_sched_meta(tile_scheduler_metadata, config)
    T = b * s_q
    q_flat = q.reshape(T, h_q, d)

    if indices is None:
        return _dense_decode(q_flat, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                             attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length,
                             b, s_q, backend)

    if causal:
        raise ValueError("causal must be False when indices is given (FlashMLA's sparse decode has no causal "
                         "mask: the indices already say what each query attends to)")
    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        raise ValueError("extra_k_cache and extra_indices_in_kvcache must be given together (both or neither)")
    if extra_k_cache is None and extra_topk_length is not None:
        raise ValueError("extra_topk_length needs extra_k_cache and extra_indices_in_kvcache")
    if extra_k_cache is None:
        out, lse = _sparse_part("indices", "k_cache", "topk_length", q_flat, k_cache, indices, topk_length, b, s_q,
                                head_dim_v, softmax_scale, attn_sink, backend, is_fp8_kvcache)
    else:
        # Two caches: two calls without the sink, merged by their LSEs, the sink applied to the union.
        parts = [
            _sparse_part("indices", "k_cache", "topk_length", q_flat, k_cache, indices, topk_length, b, s_q,
                         head_dim_v, softmax_scale, None, backend, is_fp8_kvcache),
            _sparse_part("extra_indices_in_kvcache", "extra_k_cache", "extra_topk_length", q_flat, extra_k_cache,
                         extra_indices_in_kvcache, extra_topk_length, b, s_q, head_dim_v, softmax_scale, None,
                         backend, is_fp8_kvcache),
        ]
        out, lse = _merge(parts, attn_sink, h_q, q.dtype)
    return out.reshape(b, s_q, h_q, head_dim_v), _lonely_to_inf(lse).reshape(b, s_q, h_q).transpose(1, 2)


def _sparse_part(idx_name, cache_name, len_name, q_flat, cache, idx, topk_length, b, s_q, head_dim_v, scale,
                 attn_sink, backend, fp8=False):
    need_tensor(idx_name, idx)
    need_tensor(cache_name, cache)
    need_rank(cache_name, cache, 4, "[num_blocks, page_block_size, num_heads_k, head_dim]")
    need_rank(idx_name, idx, 3, "[batch_size, seq_len_q, topk]")
    if tuple(idx.shape[:2]) != (b, s_q):
        raise ValueError(f"{idx_name} must have shape ({b}, {s_q}, topk) like q's batch and seq_len_q, "
                         f"got {tuple(idx.shape)}")
    T = b * s_q
    idx = idx.reshape(T, 1, idx.shape[-1])
    if topk_length is not None:
        need_int_tensor(len_name, topk_length, 1, "[batch_size]")
        if topk_length.shape[0] != b:
            raise ValueError(f"{len_name} must have batch_size={b} entries, got shape {tuple(topk_length.shape)}")
        j = torch.arange(idx.shape[-1], device=idx.device)
        per_token = topk_length.to(idx.device).repeat_interleave(s_q)
        idx = torch.where(j < per_token[:, None, None], idx, -1).to(idx.dtype)
    if fp8:
        return _sparse_fp8(cache_name, q_flat, cache, idx, head_dim_v, scale, attn_sink, backend)
    # The whole cache is one flat row space (slot = page * page_block_size + offset), and one index
    # list serves every kv head: FlashMLA's indices carry no kv-head dimension.
    flat = cache.reshape(cache.shape[0] * cache.shape[1], cache.shape[2], cache.shape[3])
    # No cu_seqlens: one "sequence" whose length is the whole cache, so exactly the slots outside
    # [0, num_blocks * page_block_size) are dropped, as FlashMLA's invalid-index rule says.
    return selective_attention(q_flat, flat, idx, d_v=head_dim_v, sm_scale=scale, attn_sink=attn_sink,
                               return_lse=True, backend=backend)


# FlashMLA's "FP8 with scale" token record (README, "FP8 KV Cache"; V3.2 layout): 512 float8_e4m3
# values, 4 float32 scales (one per 128 values), 64 bfloat16 rope values.
_FP8_NOPE, _FP8_TILE, _FP8_ROPE = 512, 128, 64
_FP8_SCALES = _FP8_NOPE // _FP8_TILE
_FP8_RECORD = _FP8_NOPE + 4 * _FP8_SCALES + 2 * _FP8_ROPE  # 656 bytes


# FlashMLA's MODEL1 FP8 cache (its tests/quant.py, FP8KVCacheLayout.MODEL1_FP8Sparse): d_qk = 512, of which
# 448 latent values in float8_e4m3 (7 tiles of 64, each with a power-of-two scale stored as an e8m0
# exponent byte) and 64 rope values in bfloat16. Per block of page_block_size tokens: first every token's
# 448 + 128 data bytes (576), then every token's 8 scale bytes (7 + 1 padding); blocks are padded to a
# multiple of 576 bytes in memory. 584 bytes a token; the cache is viewed as [num_blocks, page, 1, 584].
_M1_NOPE, _M1_TILE, _M1_ROPE = 448, 64, 64
_M1_SCALES = _M1_NOPE // _M1_TILE
_M1_DATA = _M1_NOPE + 2 * _M1_ROPE  # 576 bytes of a token's values
_M1_RECORD = _M1_DATA + 8  # 584


def _check_fp8_layout(name: str, cache: Tensor) -> None:
    need_tensor(name, cache)
    if cache.dim() != 4 or cache.element_size() != 1 or cache.shape[2] != 1 \
            or cache.shape[3] not in (_FP8_RECORD, _M1_RECORD):
        raise ValueError(f"{name} with is_fp8_kvcache=True must be one of FlashMLA's FP8 layouts of 1-byte elements: "
                         f"V3.2 [num_blocks, page_block_size, 1, {_FP8_RECORD}] or MODEL1 [num_blocks, "
                         f"page_block_size, 1, {_M1_RECORD}], got {tuple(cache.shape)} "
                         f"{dtype_name(cache.dtype)}")
    if cache.stride(3) != 1:
        raise ValueError(f"{name}: the bytes of a record must be contiguous (last stride 1), got strides "
                         f"{tuple(cache.stride())}")


def _byte_views(name: str, raw: Tensor, parts):
    """Views of ``raw`` (uint8) as ``(size, stride, offset, dtype)`` parts; a ValueError naming ``name``
    when a stride or offset does not allow the wider dtype."""
    try:
        return tuple(raw.as_strided(size, stride, raw.storage_offset() + off).view(dt)
                     for size, stride, off, dt in parts)
    except RuntimeError as e:
        raise ValueError(f"{name}'s strides {tuple(raw.stride())} (bytes) cannot be viewed as its record's "
                         f"parts: {e}") from None


def unpack_fp8_kvcache(k_cache: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """FlashMLA's V3.2 FP8 cache [num_blocks, page_block_size, 1, 656] -> ``(kv_q, kv_scale, kv_rope)``,
    views of the same memory (nothing is copied), ready for ``selective_attention(kv=kv_q,
    kv_scale=kv_scale, kv_rope=kv_rope, scale_block=128)``:

    kv_q [nb, page, 1, 512] float8_e4m3fn (bytes 0..511 of each record), kv_scale [nb, page, 1, 4]
    float32 (bytes 512..527), kv_rope [nb, page, 1, 64] bfloat16 (bytes 528..655). The cache may be a
    strided view (FlashMLA's quantizer pads each block by a record); its strides must be multiples of
    4 bytes, which a 656-byte record always gives unless the cache is sliced inside a record.
    """
    _check_fp8_layout("k_cache", k_cache)
    if k_cache.shape[3] != _FP8_RECORD:
        raise ValueError(f"k_cache must be FlashMLA's V3.2 layout [num_blocks, page_block_size, 1, {_FP8_RECORD}] "
                         f"(unpack_model1_fp8_kvcache reads the {_M1_RECORD}-byte MODEL1 one), got {tuple(k_cache.shape)}")
    raw = k_cache.view(torch.uint8)
    a, b = _FP8_NOPE, _FP8_NOPE + 4 * _FP8_SCALES
    lead, st = tuple(raw.shape[:3]), tuple(raw.stride()[:3])
    return _byte_views("k_cache", raw, [(lead + (a,), st + (1,), 0, torch.float8_e4m3fn),
                                        (lead + (b - a,), st + (1,), a, torch.float32),
                                        (lead + (_FP8_RECORD - b,), st + (1,), b, torch.bfloat16)])


def unpack_model1_fp8_kvcache(k_cache: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """FlashMLA's MODEL1 FP8 cache [num_blocks, page_block_size, 1, 584] -> ``(kv_q, kv_scale_e8m0, kv_rope)``,
    views of the same memory: kv_q [nb, page, 1, 448] float8_e4m3fn, kv_scale_e8m0 [nb, page, 1, 7]
    float8_e8m0fnu (a tile's scale is 2^(byte - 127); ``.to(torch.float32)`` gives the op's ``kv_scale``,
    tiles of 64), kv_rope [nb, page, 1, 64] bfloat16. Within a block the values of token t start at byte
    576 t and its scale bytes at 576 page + 8 t; the block stride (bytes) must be a multiple of 576."""
    _check_fp8_layout("k_cache", k_cache)
    if k_cache.shape[3] != _M1_RECORD:
        raise ValueError(f"k_cache must be FlashMLA's MODEL1 layout [num_blocks, page_block_size, 1, {_M1_RECORD}], "
                         f"got {tuple(k_cache.shape)}")
    nb, page = k_cache.shape[0], k_cache.shape[1]
    raw = k_cache.view(torch.uint8)
    block = raw.stride(0)
    if nb > 1 and (block % _M1_DATA or block < page * _M1_RECORD):
        raise ValueError(f"k_cache's block stride {block} (bytes) must be a multiple of {_M1_DATA} holding "
                         f"page_block_size * {_M1_RECORD} bytes (FlashMLA's MODEL1 block padding)")
    if page > 1 and raw.stride(1) != _M1_RECORD:
        raise ValueError(f"k_cache must be a view of MODEL1 blocks (record stride {_M1_RECORD}), got strides "
                         f"{tuple(raw.stride())}")
    vals, scales = (block, _M1_DATA, _M1_DATA, 1), (block, 8, 8, 1)
    return _byte_views("k_cache", raw, [((nb, page, 1, _M1_NOPE), vals, 0, torch.float8_e4m3fn),
                                        ((nb, page, 1, _M1_SCALES), scales, page * _M1_DATA, torch.float8_e8m0fnu),
                                        ((nb, page, 1, 2 * _M1_ROPE), vals, _M1_NOPE, torch.bfloat16)])


def pack_fp8_kvcache(kv_q: Tensor, kv_scale: Tensor, kv_rope: Tensor) -> Tensor:
    """``(kv_q, kv_scale, kv_rope)`` -> a new FlashMLA V3.2 FP8 cache [nb, page, 1, 656] float8_e4m3fn
    (the inverse of ``unpack_fp8_kvcache``): kv_q [nb, page, 1, 512] float8_e4m3fn, kv_scale
    [nb, page, 1, 4] float32 (tiles of 128), kv_rope [nb, page, 1, 64] bfloat16."""
    for name, x, dt, w in (("kv_q", kv_q, torch.float8_e4m3fn, _FP8_NOPE), ("kv_scale", kv_scale, torch.float32,
                           _FP8_SCALES), ("kv_rope", kv_rope, torch.bfloat16, _FP8_ROPE)):
        need_tensor(name, x)
        need_rank(name, x, 4, f"[num_blocks, page_block_size, 1, {w}]")
        if x.dtype != dt:
            raise TypeError(f"{name} must be {dtype_name(dt)}, got {dtype_name(x.dtype)}")
        if x.shape[2] != 1 or x.shape[3] != w or tuple(x.shape[:2]) != tuple(kv_q.shape[:2]):
            raise ValueError(f"{name} must have shape ({kv_q.shape[0]}, {kv_q.shape[1]}, 1, {w}), got {tuple(x.shape)}")
    out = torch.empty(*kv_q.shape[:3], _FP8_RECORD, dtype=torch.float8_e4m3fn, device=kv_q.device)
    q_part, s_part, r_part = unpack_fp8_kvcache(out)
    q_part.copy_(kv_q)
    s_part.copy_(kv_scale)
    r_part.copy_(kv_rope)
    return out


def quantize_fp8_kvcache(kv: Tensor) -> Tensor:
    """A float cache [nb, page, 1, 576] (512 latent + 64 rope) -> FlashMLA's V3.2 FP8 cache
    [nb, page, 1, 656]: ``attention.quantize_kv`` on the 512 latent columns (tiles of 128, amax / 448),
    the rope part rounded to bfloat16."""
    need_tensor("kv", kv)
    need_rank("kv", kv, 4, f"[num_blocks, page_block_size, 1, {_FP8_NOPE + _FP8_ROPE}]")
    if kv.shape[2] != 1 or kv.shape[3] != _FP8_NOPE + _FP8_ROPE:
        raise ValueError(f"kv must be [num_blocks, page_block_size, 1, {_FP8_NOPE + _FP8_ROPE}], got {tuple(kv.shape)}")
    kv_q, kv_scale = quantize_kv(kv[..., :_FP8_NOPE], torch.float8_e4m3fn, _FP8_TILE)
    return pack_fp8_kvcache(kv_q, kv_scale, kv[..., _FP8_NOPE:].to(torch.bfloat16))


def _slot_rows(x: Tensor, rows_per_block: int) -> Tensor:
    """A paged view [nb, page, 1, w] -> [R, 1, w] over the same memory, where the slot (block, offset)
    is row ``block * rows_per_block + offset`` (a block padded in memory has more rows than ``page``;
    its padding rows are never named by a remapped slot)."""
    nb, page = x.shape[0], x.shape[1]
    rows = (nb - 1) * rows_per_block + page if nb else 0
    return x.as_strided((rows, 1, x.shape[3]), (x.stride(1), x.stride(2), x.stride(3)))


def _sparse_fp8(cache_name, q_flat, cache, idx, head_dim_v, scale, attn_sink, backend):
    """The sparse decode on FlashMLA's FP8 caches through the op's quantized-cache arguments: the records
    are viewed (never copied, never dequantized here) and the flat slot indices are mapped onto the
    rows of those views. The backend dequantizes the rows it selects.

    V3.2 (656 bytes): one call, value = the dequantized latent. MODEL1 (584 bytes): its e8m0 scale bytes
    become the float32 ``kv_scale`` the op takes (4 bytes per tile per cached token, a pass over the scales
    only), and since its value is the whole 512-wide row (448 latent + 64 rope values, K = V), a
    ``head_dim_v`` above 448 adds a second call with the rope part as a separate ``v``: the same scores
    and softmax, the rope columns of the output.
    """
    _check_fp8_layout(cache_name, cache)
    model1 = cache.shape[3] == _M1_RECORD
    nope, rope_w, tile = (_M1_NOPE, _M1_ROPE, _M1_TILE) if model1 else (_FP8_NOPE, _FP8_ROPE, _FP8_TILE)
    d = q_flat.shape[-1]
    if d != nope + rope_w:
        raise ValueError(f"q must have head_dim {nope + rope_w} with is_fp8_kvcache=True and a {cache.shape[3]}-byte "
                         f"record ({nope} latent + {rope_w} rope columns), got {d}")
    if head_dim_v > (d if model1 else nope):
        raise ValueError(f"head_dim_v must be at most {d if model1 else nope} with this FP8 layout, got {head_dim_v}")
    nb, page = cache.shape[0], cache.shape[1]
    if model1:
        kv_q, kv_scale, kv_rope = unpack_model1_fp8_kvcache(cache)
        kv_scale = kv_scale.to(torch.float32)  # e8m0 -> float32: a new [nb, page, 1, 7] tensor
        rpb = cache.stride(0) // _M1_DATA if nb > 1 else page  # rows of the value views per block
    else:
        if nb > 1 and cache.stride(0) % cache.stride(1) != 0:
            raise ValueError(f"{cache_name}'s block stride {cache.stride(0)} must be a multiple of its record "
                             f"stride {cache.stride(1)}")
        kv_q, kv_scale, kv_rope = unpack_fp8_kvcache(cache)
        rpb = cache.stride(0) // cache.stride(1) if nb > 1 else page
    if model1 and nb > 1 and rpb != page:
        # The converted scales are dense [nb, page]: lay them out with the value views' row numbering.
        padded = kv_scale.new_zeros(nb, rpb, 1, _M1_SCALES)
        padded[:, :page] = kv_scale
        kv_scale = padded[:, :page]
    kv_q, kv_scale, kv_rope = (_slot_rows(x, rpb) for x in (kv_q, kv_scale, kv_rope))
    # Flat slot -> row of the views; an invalid slot (< 0 or >= nb * page: FlashMLA's rule) becomes -1.
    i = idx.to(torch.int64)
    valid = (i >= 0) & (i < nb * page)
    rows = torch.where(valid, (i // page) * rpb + i % page, -1)
    if q_flat.dtype != torch.bfloat16:
        # The op computes with q's dtype and wants kv_rope in it: a float32 / float16 query converts the
        # rope part (FlashMLA itself takes bfloat16 queries only, with no such copy).
        kv_rope = kv_rope.to(q_flat.dtype)
    common = dict(q_rope=q_flat[..., nope:], kv_rope=kv_rope, kv_scale=kv_scale, scale_block=tile, sm_scale=scale,
                  attn_sink=attn_sink, return_lse=True, backend=backend)
    q_nope = q_flat[..., :nope]
    out, lse = selective_attention(q_nope, kv_q, rows, d_v=min(head_dim_v, nope), **common)
    if head_dim_v > nope:  # MODEL1: the rope columns of the value
        out_rope, _ = selective_attention(q_nope, kv_q, rows, v=kv_rope[..., :head_dim_v - nope], **common)
        out = torch.cat([out, out_rope], dim=-1)
    return out, lse


def _merge(parts, attn_sink, h_q, dtype):
    """Combine attention over disjoint candidate sets by their LSEs (exact up to the rounding of each
    part's output to q's dtype), then apply the sink once to the union."""
    lses = torch.stack([lse for _, lse in parts])  # [n, T, H]
    lse = torch.logsumexp(lses, dim=0)
    m = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w = torch.exp(lses - m)  # weight of each part relative to the union (0 for an empty part)
    denom = w.sum(0)
    if attn_sink is not None:
        denom = denom + torch.exp(attn_sink.to(torch.float32).reshape(1, h_q) - m)
    denom = denom.clamp_min(torch.finfo(torch.float32).tiny)
    out = sum(o.to(torch.float32) * wi[..., None] for (o, _), wi in zip(parts, w)) / denom[..., None]
    empty = lse == float("-inf")
    out = out.masked_fill(empty[..., None], 0.0)
    return out.to(dtype), lse


def _dense_decode(q_flat, k_cache, block_table, cache_seqlens, head_dim_v, scale, causal, attn_sink,
                  extra_k_cache, extra_indices, topk_length, extra_topk_length, b, s_q, backend):
    for name, x in (("extra_k_cache", extra_k_cache), ("extra_indices_in_kvcache", extra_indices),
                    ("topk_length", topk_length), ("extra_topk_length", extra_topk_length)):
        if x is not None:
            raise ValueError(f"{name} must be None on the dense path (indices=None), as in FlashMLA")
    if block_table is None or cache_seqlens is None:
        raise ValueError("block_table and cache_seqlens are required on the dense path (indices=None)")
    need_int_tensor("block_table", block_table, 2, "[batch_size, max_num_blocks_per_seq]")
    need_int_tensor("cache_seqlens", cache_seqlens, 1, "[batch_size]")
    if block_table.shape[0] != b or cache_seqlens.shape[0] != b:
        raise ValueError(f"block_table and cache_seqlens must have batch_size={b} rows, got "
                         f"{tuple(block_table.shape)} and {tuple(cache_seqlens.shape)}")
    page = k_cache.shape[1]
    # Dense = select every position the table can address; positions >= cache_seqlens[i] are dropped
    # by the contract. K comes from the table's shape, so no host read of cache_seqlens is needed.
    K = block_table.shape[1] * page
    dev = q_flat.device
    # Materialised (not an expand view) so that no backend has to honour a zero stride.
    idx = torch.arange(K, device=dev, dtype=torch.int32).reshape(1, 1, K).expand(b * s_q, 1, K).contiguous()
    cu_q = torch.arange(b + 1, device=dev, dtype=torch.int32) * s_q
    out, lse = selective_attention(
        q_flat, k_cache, idx, d_v=head_dim_v, sm_scale=scale, cu_seqlens_q=cu_q, block_table=block_table,
        seqlens_k=cache_seqlens, causal=bool(causal), attn_sink=attn_sink, return_lse=True, backend=backend)
    h_q = q_flat.shape[1]
    return out.reshape(b, s_q, h_q, head_dim_v), _lonely_to_inf(lse).reshape(b, s_q, h_q).transpose(1, 2)
