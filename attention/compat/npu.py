"""torch_npu's sparse-attention ops on top of this package.

``npu_sparse_flash_attention`` maps to ``attention.selective_attention`` and ``npu_lightning_indexer``
to ``attention.select`` / ``attention.lightning_indexer`` + ``attention.topk_indices`` (docs/spec.md sections
1-2), with torch_npu's documented argument names, layouts and return values (op-plugin
docs/context/torch_npu-npu_sparse_flash_attention.md, torch_npu-npu_lightning_indexer.md,
op_plugin/ops/opapi/*KernelNpuOpApi.cpp; CANN ops-transformer attention/*/README.md). torch_npu's
hardware limits (KV_N = 1, D = 512 + 64, N1 in {1..128}, valid indices packed first, power-of-two
sparse_block_size, ...) are not inherited. docs/migration.md lists every difference.

Layouts are translated without reading any length on the host and without host-to-device copies
(every helper tensor is made by device ops, so the shims can be captured in a CUDA/NPU graph):
"BSND" tensors are viewed as B * S rows, a "BSND" kv as a paged cache of B pages of S2 rows, "TND"
lengths (prefix sums) become ``cu_seqlens`` by a concatenation on the device, and the padding rows of a "BSND" query (those past
``actual_seq_lengths_query[b]``) become sequences of their own with no keys, so they output zeros
and select nothing.

``prefer_vendor=True`` calls torch_npu's own op instead (for the equivalence suite on an NPU); it
raises a RuntimeError when torch_npu cannot be imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..api import selective_attention
from ._common import max_logits as _max_logits
from ._common import need_choice, need_int_tensor, need_rank, need_tensor, selection_backend_for

__all__ = ["npu_sparse_flash_attention", "npu_lightning_indexer"]

_DEFAULT_WINDOW = (1 << 63) - 1  # torch_npu's pre_tokens / next_tokens default (2^63 - 1): no window
LAYOUTS_QUERY = ("BSND", "TND")
LAYOUTS_KV = ("BSND", "TND", "PA_BSND")
SPARSE_MODES = {0: False, 3: True}  # 0: no mask; 3: rightDownCausal (bottom-right aligned causal)
ATTENTION_MODES = (0, 2)


def _vendor():
    """torch_npu, or a RuntimeError saying why prefer_vendor=True cannot be honoured."""
    try:
        return importlib.import_module("torch_npu")
    except Exception as e:  # ImportError, or torch_npu failing to load CANN libraries
        raise RuntimeError(
            f"prefer_vendor=True calls torch_npu's own op, but torch_npu cannot be imported here ({e!r}); "
            f"call with prefer_vendor=False to run this package's implementation") from e


def _lengths(name: str, x, dev) -> Optional[Tensor]:
    """torch_npu documents these as int32 tensors; model code often holds them as Python lists, which
    are host data already, so a list becomes a tensor on the query's device (a copy, not a sync)."""
    if isinstance(x, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
            raise TypeError(f"{name} must be an int tensor or a list of ints, got {x!r}")
        return torch.tensor(x, dtype=torch.int32, device=dev)
    return x


def _check_window(name: str, value) -> None:
    if value is not None and value != _DEFAULT_WINDOW:
        raise ValueError(f"{name} must be 2^63-1 (the default, no window; torch_npu supports only that value), "
                         f"got {value!r}")


# ----------------------------------------------------------------------------------------------
# Layout translation
# ----------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """How one torch_npu call maps onto the flat token layout of docs/spec.md section 1."""

    T: int  # flat query rows
    B: int  # batches
    seq_batch: Tensor  # [NS] batch of each of our sequences
    seq_pad: Tensor  # [NS] bool: a padding pseudo-sequence (no keys)
    cu_seqlens_q: Optional[Tensor]  # [NS+1] or None (one sequence)
    query_shape: Tuple[int, ...]  # leading dims to restore on the outputs: (B, S1) or (T1,)
    # kv side, filled by _plan_kv
    paged: bool = False
    cu_seqlens_k: Optional[Tensor] = None
    block_table: Optional[Tensor] = None
    seqlens_k: Optional[Tensor] = None
    max_seqlen_k: int = 0  # an upper bound of every kv length, known from shapes only


def _plan_query(layout_query: str, query: Tensor, actual_q: Optional[Tensor], rank_name: str) -> _Plan:
    dev = query.device
    if layout_query == "BSND":
        need_rank(rank_name, query, 4, "[B, S1, N1, D] with layout_query='BSND'")
        B, S1 = query.shape[0], query.shape[1]
        if actual_q is None:
            ar = torch.arange(B, device=dev)
            return _Plan(T=B * S1, B=B, seq_batch=ar, seq_pad=torch.zeros(B, dtype=torch.bool, device=dev),
                         cu_seqlens_q=(torch.arange(B + 1, device=dev, dtype=torch.int32) * S1) if B > 1 else None,
                         query_shape=(B, S1))
        need_int_tensor("actual_seq_lengths_query", actual_q, 1, "[B] valid query tokens per batch")
        if actual_q.shape[0] != B:
            raise ValueError(f"actual_seq_lengths_query must have B={B} entries (query's batch), "
                             f"got shape {tuple(actual_q.shape)}")
        # Batch b = a sequence of its actual_q[b] valid rows, then a pseudo-sequence of its padding rows.
        starts = torch.arange(B, device=dev, dtype=torch.int64) * S1
        a = actual_q.to(dev, torch.int64).clamp(0, S1)
        bounds = torch.stack([starts + a, starts + S1], dim=1).reshape(-1)
        cu = torch.cat([torch.zeros(1, device=dev, dtype=torch.int64), bounds]).to(torch.int32)
        return _Plan(T=B * S1, B=B, seq_batch=torch.arange(B, device=dev).repeat_interleave(2),
                     seq_pad=torch.arange(2 * B, device=dev) % 2 == 1, cu_seqlens_q=cu,
                     query_shape=(B, S1))
    need_rank(rank_name, query, 3, "[T1, N1, D] with layout_query='TND'")
    if actual_q is None:
        raise ValueError("actual_seq_lengths_query is required with layout_query='TND' (prefix sums of the "
                         "query tokens per batch)")
    need_int_tensor("actual_seq_lengths_query", actual_q, 1, "[B] prefix sums with layout_query='TND'")
    B = actual_q.shape[0]
    if B < 1:
        raise ValueError("actual_seq_lengths_query must have at least one entry")
    T1 = query.shape[0]
    # Rows past the last prefix sum (if any) form a trailing pseudo-sequence with no keys.
    cu = torch.cat([torch.zeros(1, device=dev, dtype=torch.int32), actual_q.to(dev, torch.int32),
                    torch.full((1,), T1, device=dev, dtype=torch.int32)])
    seq_batch = torch.cat([torch.arange(B, device=dev), torch.full((1,), B - 1, device=dev, dtype=torch.int64)])
    seq_pad = torch.cat([torch.zeros(B, dtype=torch.bool, device=dev), torch.ones(1, dtype=torch.bool, device=dev)])
    return _Plan(T=T1, B=B, seq_batch=seq_batch, seq_pad=seq_pad, cu_seqlens_q=cu, query_shape=(T1,))


def _plan_kv(plan: _Plan, layout_kv: str, key: Tensor, actual_kv: Optional[Tensor], block_table: Optional[Tensor],
             kv_len_name: str, layout_name: str, key_name: str = "key") -> None:
    dev = key.device
    B = plan.B
    if layout_kv != "PA_BSND" and block_table is not None:
        raise ValueError(f"block_table is only for {layout_name}='PA_BSND', got {layout_name}={layout_kv!r}")
    if layout_kv == "BSND":
        need_rank(key_name, key, 4, f"[B, S2, N2, D] with {layout_name}='BSND'")
        if key.shape[0] != B:
            raise ValueError(f"{key_name} must have the query's batch B={B} as its first dimension with "
                             f"{layout_name}='BSND', got shape {tuple(key.shape)}")
        S2 = key.shape[1]
        if actual_kv is None:
            L = torch.full((B,), S2, device=dev, dtype=torch.int32)
        else:
            need_int_tensor(kv_len_name, actual_kv, 1, "[B] valid key tokens per batch")
            if actual_kv.shape[0] != B:
                raise ValueError(f"{kv_len_name} must have B={B} entries, got shape {tuple(actual_kv.shape)}")
            L = actual_kv.to(dev, torch.int32)
        # A [B, S2, N2, D] tensor is a paged cache of B pages of S2 rows: page b is batch b. This gives every
        # batch its own length without moving any data.
        plan.paged = True
        plan.block_table = plan.seq_batch.to(torch.int32).reshape(-1, 1)
        plan.seqlens_k = torch.where(plan.seq_pad, 0, L[plan.seq_batch]).to(torch.int32)
        plan.max_seqlen_k = S2
    elif layout_kv == "TND":
        need_rank(key_name, key, 3, f"[T2, N2, D] with {layout_name}='TND'")
        if actual_kv is None:
            raise ValueError(f"{kv_len_name} is required with {layout_name}='TND' (prefix sums of the key tokens)")
        need_int_tensor(kv_len_name, actual_kv, 1, f"[B] prefix sums with {layout_name}='TND'")
        if actual_kv.shape[0] != B:
            raise ValueError(f"{kv_len_name} must have B={B} entries like the query side, "
                             f"got shape {tuple(actual_kv.shape)}")
        ends = actual_kv.to(dev, torch.int32)[plan.seq_batch]
        # A padding pseudo-sequence ends where its batch's keys end, so it starts there too: length 0.
        plan.cu_seqlens_k = torch.cat([torch.zeros(1, device=dev, dtype=torch.int32), ends])
        plan.max_seqlen_k = key.shape[0]
    else:  # PA_BSND
        need_rank(key_name, key, 4, f"[block_num, block_size, N2, D] with {layout_name}='PA_BSND'")
        if block_table is None:
            raise ValueError(f"block_table is required with {layout_name}='PA_BSND'")
        if actual_kv is None:
            raise ValueError(f"{kv_len_name} is required with {layout_name}='PA_BSND'")
        need_int_tensor("block_table", block_table, 2, "[B, max_blocks]")
        need_int_tensor(kv_len_name, actual_kv, 1, "[B] valid key tokens per batch")
        if block_table.shape[0] != B or actual_kv.shape[0] != B:
            raise ValueError(f"block_table and {kv_len_name} must have B={B} rows, got "
                             f"{tuple(block_table.shape)} and {tuple(actual_kv.shape)}")
        plan.paged = True
        trivial = plan.seq_batch.numel() == B  # no padding sequences: the table is used as is
        plan.block_table = block_table if trivial else block_table[plan.seq_batch]
        L = actual_kv.to(dev, torch.int32)
        plan.seqlens_k = L if trivial else torch.where(plan.seq_pad, 0, L[plan.seq_batch]).to(torch.int32)
        plan.max_seqlen_k = block_table.shape[1] * key.shape[1]
    if not plan.paged and plan.cu_seqlens_q is None:
        # one contiguous sequence: give cu_seqlens_q so that cu_seqlens_k is accepted
        plan.cu_seqlens_q = torch.arange(2, device=dev, dtype=torch.int32) * plan.T


def _q_flat(t: Optional[Tensor], layout_query: str) -> Optional[Tensor]:
    if t is None or layout_query == "TND":
        return t
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _q_unflat(t: Tensor, plan: _Plan) -> Tensor:
    return t.reshape(*plan.query_shape, *t.shape[1:])


def _row_reach(plan: _Plan, causal: bool, dev) -> Tuple[Tensor, Tensor]:
    """Per flat query row: (threshold, skipped), computed on the device from the plan.

    ``threshold`` is Huawei's golden's bound on the key positions a row may read: its kv length, or
    with ``sparse_mode=3`` the row's bottom-right causal position + 1. ``skipped`` marks the rows the
    golden never computes (query padding rows, and causal rows with threshold <= 0), whose softmax
    statistics stay at their zero initialisation.
    """
    T = plan.T
    t = torch.arange(T, device=dev)
    if plan.cu_seqlens_q is None:
        seq = torch.zeros(T, device=dev, dtype=torch.int64)
        first = torch.zeros(1, device=dev, dtype=torch.int64)
        lq = torch.full((1,), T, device=dev, dtype=torch.int64)
    else:
        cu = plan.cu_seqlens_q.to(torch.int64)
        seq = torch.searchsorted(cu[1:], t, right=True)  # sequence s holds rows [cu[s], cu[s+1])
        first, lq = cu[:-1], cu[1:] - cu[:-1]
    if plan.paged:
        lk = plan.seqlens_k.to(torch.int64)
    else:
        ck = plan.cu_seqlens_k.to(torch.int64)
        lk = ck[1:] - ck[:-1]
    L = lk[seq]
    threshold = (L - lq[seq] + (t - first[seq]) + 1) if causal else L
    skipped = plan.seq_pad[seq] | ((threshold <= 0) if causal else torch.zeros_like(plan.seq_pad[seq]))
    return threshold, skipped


def _golden_indices(idx: Tensor, threshold: Tensor, block_size: int) -> Tensor:
    """``idx`` [T, N2, K] as Huawei's golden reads it: a row reads at most ceil(threshold / block_size)
    entries and stops at its first -1 (valid indices are packed first); entries it does not read
    become -1. Everything the golden does read is then dropped or kept by docs/spec.md's rules."""
    limit = torch.div(threshold.clamp_min(0) + block_size - 1, block_size, rounding_mode="floor")
    pos = torch.arange(idx.shape[-1], device=idx.device)
    before_stop = torch.cumsum((idx == -1).to(torch.int32), dim=-1) == 0
    keep = before_stop & (pos < limit[:, None, None])
    return torch.where(keep, idx, torch.full_like(idx, -1))


# ----------------------------------------------------------------------------------------------
# npu_sparse_flash_attention
# ----------------------------------------------------------------------------------------------

def npu_sparse_flash_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sparse_indices: Tensor,
    scale_value: float,
    *,
    block_table: Optional[Tensor] = None,
    actual_seq_lengths_query: Optional[Tensor] = None,
    actual_seq_lengths_kv: Optional[Tensor] = None,
    query_rope: Optional[Tensor] = None,
    key_rope: Optional[Tensor] = None,
    sparse_block_size: int = 1,
    layout_query: str = "BSND",
    layout_kv: str = "BSND",
    sparse_mode: int = 3,
    pre_tokens: int = _DEFAULT_WINDOW,
    next_tokens: int = _DEFAULT_WINDOW,
    attention_mode: int = 0,
    return_softmax_lse: bool = False,
    sinks: Optional[Tensor] = None,
    prefer_vendor: bool = False,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """torch_npu.npu_sparse_flash_attention. Returns ``(attention_out, softmax_max, softmax_sum)``.

    attention_out has the query's layout ([B, S1, N1, Dv] or [T1, N1, Dv]). With
    ``return_softmax_lse=True``, softmax_max and softmax_sum are [B, N2, S1, N1/N2] ("BSND") or
    [N2, T1, N1/N2] ("TND") float32, as Huawei's golden computes them: the row max of the scaled
    logits and the sink (when given), and the sum of exp(logit - softmax_max) plus exp(sink -
    softmax_max), so that ``softmax_max + log(softmax_sum)`` is the log of the full softmax
    denominator; 0 and 0 for a row with no kept key and no sink, and for the rows the golden skips
    (query padding, causal rows that see no key). Otherwise both are empty [0] float32 tensors, as
    torch_npu returns them.

    ``sparse_indices[.., j]`` names key positions ``[j * sparse_block_size, (j+1) * sparse_block_size)``
    of the query's batch (logical positions: through ``block_table`` with "PA_BSND"). As in the
    golden, a row reads at most ``ceil(threshold / sparse_block_size)`` entries (threshold: the kv
    length, or the causal position + 1) and stops at its first -1; other negative and out-of-range
    entries it reads are dropped.
    """
    if prefer_vendor:
        return _vendor_sparse_flash_attention(
            query, key, value, sparse_indices, scale_value, sinks, block_table=block_table,
            actual_seq_lengths_query=actual_seq_lengths_query, actual_seq_lengths_kv=actual_seq_lengths_kv,
            query_rope=query_rope, key_rope=key_rope, sparse_block_size=sparse_block_size,
            layout_query=layout_query, layout_kv=layout_kv, sparse_mode=sparse_mode, pre_tokens=pre_tokens,
            next_tokens=next_tokens, attention_mode=attention_mode, return_softmax_lse=return_softmax_lse)
    _check_sfa_arguments(query, key, value, sparse_indices, query_rope, key_rope, sinks, scale_value,
                         layout_query, layout_kv, sparse_mode, attention_mode, pre_tokens, next_tokens)
    actual_seq_lengths_query = _lengths("actual_seq_lengths_query", actual_seq_lengths_query, query.device)
    actual_seq_lengths_kv = _lengths("actual_seq_lengths_kv", actual_seq_lengths_kv, query.device)
    plan = _plan_query(layout_query, query, actual_seq_lengths_query, "query")
    _plan_kv(plan, layout_kv, key, actual_seq_lengths_kv, block_table, "actual_seq_lengths_kv", "layout_kv")
    _check_sfa_shapes(query, key, value, sparse_indices, query_rope, key_rope, layout_query)

    q = _q_flat(query, layout_query)
    causal = SPARSE_MODES[sparse_mode]
    threshold, skipped = _row_reach(plan, causal, query.device)
    idx = _golden_indices(_q_flat(sparse_indices, layout_query), threshold, sparse_block_size)
    # MLA-absorb passes the same tensor as key and value: use latent mode (value = kv[..., :D]) so the
    # rows are gathered once.
    shared = value is key or (value.data_ptr() == key.data_ptr() and value.shape == key.shape
                              and value.stride() == key.stride() and value.dtype == key.dtype)
    kw = dict(
        q_rope=_q_flat(query_rope, layout_query), kv_rope=key_rope, sm_scale=float(scale_value),
        block_size=sparse_block_size, cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k,
        block_table=plan.block_table, seqlens_k=plan.seqlens_k, causal=causal)
    out, lse = selective_attention(q, key, idx, v=None if shared else value, d_v=key.shape[-1] if shared else None,
                                   attn_sink=sinks, return_lse=True, backend=backend, **kw)
    out = _q_unflat(out, plan)
    if not return_softmax_lse:
        empty = torch.empty(0, device=query.device, dtype=torch.float32)
        return out, empty, empty.clone()
    with torch.no_grad():  # a statistic: no gradient flows through the row max
        mx = _max_logits(q, key, idx, **kw)  # [T, N1], -inf where no candidate is kept
    mx, ssum = _golden_softmax_statistics(mx, lse.detach(), sinks, skipped)
    N1, N2 = query.shape[-2], key.shape[-2]
    return out, _vendor_statistics_layout(mx, plan, layout_query, N2, N1 // N2), \
        _vendor_statistics_layout(ssum, plan, layout_query, N2, N1 // N2)


def _vendor_sparse_flash_attention(query, key, value, sparse_indices, scale_value, sinks, **kw):
    """``prefer_vendor=True``: torch_npu's own operator with the same arguments."""
    if sinks is not None:  # older torch_npu builds have no sinks keyword
        kw["sinks"] = sinks
    return _vendor().npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, **kw)


def _check_sfa_arguments(query, key, value, sparse_indices, query_rope, key_rope, sinks, scale_value,
                         layout_query, layout_kv, sparse_mode, attention_mode, pre_tokens, next_tokens) -> None:
    """Types and choices of npu_sparse_flash_attention's arguments (before any shape is read)."""
    for name, x in (("query", query), ("key", key), ("value", value), ("sparse_indices", sparse_indices)):
        need_tensor(name, x)
    for name, x in (("query_rope", query_rope), ("key_rope", key_rope), ("sinks", sinks)):
        need_tensor(name, x, optional=True)
    need_choice("layout_query", layout_query, LAYOUTS_QUERY)
    need_choice("layout_kv", layout_kv, LAYOUTS_KV)
    need_choice("sparse_mode", sparse_mode, tuple(SPARSE_MODES))
    need_choice("attention_mode", attention_mode, ATTENTION_MODES)
    _check_window("pre_tokens", pre_tokens)
    _check_window("next_tokens", next_tokens)
    if isinstance(scale_value, bool) or not isinstance(scale_value, (int, float)):
        raise TypeError(f"scale_value must be a float, got {type(scale_value).__name__}")


def _check_sfa_shapes(query, key, value, sparse_indices, query_rope, key_rope, layout_query) -> None:
    """Shape rules between the vendor tensors that the plan does not check (heads, value, indices, rope)."""
    if query.shape[-2] % key.shape[-2] != 0:
        raise ValueError(f"query's head count N1={query.shape[-2]} must be a multiple of key's N2={key.shape[-2]}")
    if value.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"value must have key's shape except the last dimension {tuple(key.shape[:-1])}, "
                         f"got {tuple(value.shape)}")
    want_idx = (4 if layout_query == "BSND" else 3)
    need_rank("sparse_indices", sparse_indices, want_idx,
              "[B, S1, N2, sparse_size]" if layout_query == "BSND" else "[T1, N2, sparse_size]")
    if tuple(sparse_indices.shape[:want_idx - 2]) != tuple(query.shape[:want_idx - 2]):
        raise ValueError(f"sparse_indices must have the query's leading shape {tuple(query.shape[:want_idx - 2])}, "
                         f"got {tuple(sparse_indices.shape)}")
    if query_rope is not None and tuple(query_rope.shape[:-1]) != tuple(query.shape[:-1]):
        raise ValueError(f"query_rope must have the query's shape except the last dimension, "
                         f"got {tuple(query_rope.shape)} for query {tuple(query.shape)}")
    if key_rope is not None and tuple(key_rope.shape[:-1]) != tuple(key.shape[:-1]):
        raise ValueError(f"key_rope must have key's shape except the last dimension, "
                         f"got {tuple(key_rope.shape)} for key {tuple(key.shape)}")


def _golden_softmax_statistics(mx: Tensor, lse: Tensor, sinks: Optional[Tensor],
                               skipped: Tensor) -> Tuple[Tensor, Tensor]:
    """(softmax_max, softmax_sum) [T, N1] from the row max of the logits and the op's lse.

    Huawei's golden (see docs/migration.md, torch_npu item 3): the sink takes part in both statistics
    (max(logits, sink), and exp(sink - max) in the sum), and a row the golden does not compute, or one
    with no kept key and no sink, reports softmax_max = softmax_sum = 0.
    """
    if sinks is not None:
        sink = sinks.detach().to(device=mx.device, dtype=torch.float32)[None, :]
        mx = torch.maximum(mx, sink)
        ssum = torch.exp(lse - mx) + torch.exp(sink - mx)
    else:
        ssum = torch.exp(lse - mx)
    zero = skipped[:, None] | torch.isneginf(mx)
    return torch.where(zero, 0.0, mx), torch.where(zero, 0.0, ssum)


def _vendor_statistics_layout(x: Tensor, plan: _Plan, layout_query: str, N2: int, heads_per_kv: int) -> Tensor:
    """[T, N1] -> [B, N2, S1, N1/N2] ("BSND") or [N2, T1, N1/N2] ("TND"), as torch_npu returns them."""
    if layout_query == "BSND":
        B, S1 = plan.query_shape
        return x.reshape(B, S1, N2, heads_per_kv).permute(0, 2, 1, 3).contiguous()
    return x.reshape(plan.T, N2, heads_per_kv).permute(1, 0, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# npu_lightning_indexer
# ----------------------------------------------------------------------------------------------

def _selection_api():
    missing = [n for n in ("select", "lightning_indexer", "topk_indices") if not hasattr(_attention(), n)]
    if missing:
        raise NotImplementedError(
            f"npu_lightning_indexer needs the selection API of docs/spec.md section 2 "
            f"(attention.{', attention.'.join(missing)} missing from this build)")
    return _attention()


def _attention():
    return importlib.import_module("attention")


def npu_lightning_indexer(
    query: Tensor,
    key: Tensor,
    weights: Tensor,
    *,
    actual_seq_lengths_query: Optional[Tensor] = None,
    actual_seq_lengths_key: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    layout_query: str = "BSND",
    layout_key: str = "BSND",
    sparse_count: int = 2048,
    sparse_mode: int = 3,
    pre_tokens: int = _DEFAULT_WINDOW,
    next_tokens: int = _DEFAULT_WINDOW,
    return_value: bool = False,
    prefer_vendor: bool = False,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """torch_npu.npu_lightning_indexer. Returns ``(sparse_indices, sparse_values)``.

    Score of key position s for a query row: ``sum_j weights[j] * relu(query[j] . key[s])`` (no scale,
    as torch_npu documents it); ``sparse_mode=3`` keeps s <= actual_kv - actual_q + row (bottom-right
    causal), 0 keeps every s < actual_kv. sparse_indices [B, S1, 1, sparse_count] ("BSND") or
    [T1, 1, sparse_count] ("TND") int32: valid positions first in descending score order (ties: lower
    position first), -1 at the tail; query padding rows are all -1. sparse_values: the scores of those
    positions in the query's dtype (-inf at -1 slots) with ``return_value=True``, else an empty [0]
    tensor, as torch_npu returns it. ``backend`` names a selection backend, passed to those of
    ``attention.select`` / ``lightning_indexer`` / ``topk_indices`` this call runs that it implements
    (the others choose automatically: ``_common.selection_backend_for``).
    """
    if prefer_vendor:
        torch_npu = _vendor()
        return torch_npu.npu_lightning_indexer(
            query, key, weights, actual_seq_lengths_query=actual_seq_lengths_query,
            actual_seq_lengths_key=actual_seq_lengths_key, block_table=block_table, layout_query=layout_query,
            layout_key=layout_key, sparse_count=sparse_count, sparse_mode=sparse_mode, pre_tokens=pre_tokens,
            next_tokens=next_tokens, return_value=return_value)

    for name, x in (("query", query), ("key", key), ("weights", weights)):
        need_tensor(name, x)
    need_choice("layout_query", layout_query, LAYOUTS_QUERY)
    need_choice("layout_key", layout_key, LAYOUTS_KV)
    need_choice("sparse_mode", sparse_mode, tuple(SPARSE_MODES))
    _check_window("pre_tokens", pre_tokens)
    _check_window("next_tokens", next_tokens)
    if isinstance(sparse_count, bool) or not isinstance(sparse_count, int) or sparse_count < 1:
        raise ValueError(f"sparse_count must be an int >= 1, got {sparse_count!r}")
    api = _selection_api()

    actual_seq_lengths_query = _lengths("actual_seq_lengths_query", actual_seq_lengths_query, query.device)
    actual_seq_lengths_key = _lengths("actual_seq_lengths_key", actual_seq_lengths_key, query.device)
    plan = _plan_query(layout_query, query, actual_seq_lengths_query, "query")
    _plan_kv(plan, layout_key, key, actual_seq_lengths_key, block_table, "actual_seq_lengths_key", "layout_key")
    if key.shape[-2] != 1:
        raise ValueError(f"key must have one head (N2 = 1): the index key is shared by all index heads, "
                         f"got shape {tuple(key.shape)}")
    want_w = query.shape[:-1]
    if tuple(weights.shape) != tuple(want_w):
        raise ValueError(f"weights must have shape {tuple(want_w)} (the query's shape without D), "
                         f"got {tuple(weights.shape)}")

    q = _q_flat(query, layout_query)
    w = _q_flat(weights, layout_query)
    k = key[..., 0, :]  # [S, D] or paged [P, page, D]: SPEC section 2's k_idx has no head dimension
    kw = dict(scale=1.0, cu_seqlens_q=plan.cu_seqlens_q, cu_seqlens_k=plan.cu_seqlens_k,
              block_table=plan.block_table, seqlens_k=plan.seqlens_k, max_seqlen_k=plan.max_seqlen_k,
              causal=SPARSE_MODES[sparse_mode])
    if not return_value:
        bk = selection_backend_for(("select",), backend)
        # [T, 1, K] int32, fused: no [T, L] score matrix
        idx = api.select(q, k, w, sparse_count, **kw, backend=bk["select"])
        return _q_unflat(idx, plan), torch.empty(0, device=query.device, dtype=query.dtype)
    bk = selection_backend_for(("lightning_indexer", "topk_indices"), backend)
    scores = api.lightning_indexer(q, k, w, **kw, backend=bk["lightning_indexer"])  # [T, W] float32, -inf where invalid
    idx = api.topk_indices(scores, sparse_count, backend=bk["topk_indices"])  # [T, 1, K]
    vals = torch.gather(scores, 1, idx[:, 0, :].clamp_min(0).to(torch.int64))
    vals = vals.masked_fill(idx[:, 0, :] < 0, float("-inf")).unsqueeze(1).to(query.dtype)
    return _q_unflat(idx, plan), _q_unflat(vals, plan)
