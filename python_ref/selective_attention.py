"""The selective-attention contract (docs/spec.md section 1) in pure PyTorch.

Two implementations of the same definition live here:

* :func:`selective_attention` - the chunked gather formulation. It is the CPU production path and
  the fallback on every device, so it is written to be fast and memory-bounded: it gathers only the
  selected rows, computes in float32, and walks the query tokens (and, for a token whose candidates
  alone exceed it, the candidates) in pieces whose working set stays within a byte budget
  (``chunk_bytes``, default :data:`DEFAULT_CHUNK_BYTES`), so a prefill never builds the [T, K, Dqk]
  gather and its extra memory does not grow with T, H or K. It never synchronises with the device (no ``.item()``), so it also runs
  inside CUDA graphs and ``torch.compile``.
* :func:`selective_attention_dense` - the oracle. A deliberately different formulation: per
  sequence, count how many times each position is a kept candidate and take a weighted softmax over
  *all* positions. It loops over sequences on the host and is meant for tests in float64.

Both take already-validated arguments (``attention.selective_attention`` validates); they do not
check shapes themselves.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .quantize import dequantize, scale_tiles_, stored_values

__all__ = ["selective_attention", "selective_attention_backward", "selective_attention_dense", "token_metadata",
           "tokens_per_chunk", "DEFAULT_CHUNK_BYTES"]

# The forward's working-set budget beyond its output (gathered rows, scores, index tensors of one
# piece of work), in bytes. 256 MiB keeps a DeepSeek prefill (K=2048, Dqk=576, H=128) at ~20 tokens
# per piece, large enough for efficient batched GEMMs, and any prefill within 0.5 GB of extra peak
# memory beyond its output (docs/contract.md; measured by bench/reference_targets.py). Change it per
# call with ``chunk_bytes=``, per process with ATTENTION_REFERENCE_BUDGET_BYTES (read at import).
DEFAULT_CHUNK_BYTES = int(os.environ.get("ATTENTION_REFERENCE_BUDGET_BYTES", 256 << 20))


def token_metadata(
    T: int,
    S_or_none: Optional[int],
    device: torch.device,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqlens_k: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Per query token: (sequence id, sequence length L_b, query position q_pos, kv base row).

    All int64 tensors of length T computed with device ops only (no host sync). The base row is the
    first row of the sequence in a contiguous cache (``None`` for a paged cache).
    """
    t = torch.arange(T, device=device, dtype=torch.int64)
    if cu_seqlens_q is None:
        seq = torch.zeros(T, device=device, dtype=torch.int64)
        q_start = torch.zeros(T, device=device, dtype=torch.int64)
        Lq = torch.full((T,), T, device=device, dtype=torch.int64)
    else:
        cq = cu_seqlens_q.to(torch.int64)
        # token t belongs to the sequence b with cq[b] <= t < cq[b+1]
        seq = torch.searchsorted(cq[1:].contiguous(), t, right=True).clamp_(max=cq.numel() - 2)
        q_start = cq[seq]
        Lq = cq[seq + 1] - q_start
    if seqlens_k is not None:  # paged
        L = seqlens_k.to(torch.int64)[seq]
        base = None
    elif cu_seqlens_k is not None:
        ck = cu_seqlens_k.to(torch.int64)
        base = ck[seq]
        L = ck[seq + 1] - base
    else:
        L = torch.full((T,), int(S_or_none), device=device, dtype=torch.int64)
        base = torch.zeros(T, device=device, dtype=torch.int64)
    q_pos = L - Lq + (t - q_start)
    return seq, L, q_pos, base


def bytes_per_candidate(H: int, Hkv: int, row_width: int, G: int = 1, in_bytes: int = 2, rope: bool = True,
                        scales: int = 0) -> int:
    """Peak working-set bytes of one candidate of one token in the gather path (an upper bound).

    Per kv head, the gathered row of ``row_width`` values: the gather's result in the storage dtype
    (``in_bytes`` a value; twice when one selection shared by several kv heads is regrouped per
    head) and its float32 copy (none when the storage is float32); the [H] float32 scores (three
    buffers alive at once with a rope part: scores, rope scores, their sum); the int64/bool index
    tensors (position, kept mask, row; G selections); a quantized row's ``scales`` float32 tile scales,
    gathered like the row.
    """
    per_head = in_bytes * (2 if Hkv > 1 and G == 1 else 1)
    copies = per_head + (0 if in_bytes >= 4 else 4)
    return Hkv * (row_width * copies + scales * 4 * per_head) + H * 4 * (3 if rope else 1) + G * 26


def tokens_per_chunk(H: int, Hkv: int, n: int, row_width: int, chunk_bytes: Optional[int] = None) -> int:
    """Query tokens per chunk so that one chunk's working set stays under ``chunk_bytes`` (at least 1)."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per_token = n * bytes_per_candidate(H, Hkv, row_width)
    return max(1, int(budget // max(1, per_token)))


class _Call:
    """Per-call constants: sizes, flattened storages, and the per-token sequence facts.

    The per-token facts are Python ints when the call holds one contiguous sequence (the decode
    fast path: no metadata tensors at all), else int64 tensors computed on the device.
    """

    def __init__(self, q, kv, indices, v, d_v, q_rope, kv_rope, sm_scale, block_size, cu_seqlens_q,
                 cu_seqlens_k, block_table, seqlens_k, causal, attn_sink, token_offset, total_tokens,
                 kv_scale=None, v_scale=None, scale_block=128):
        Tc, H, Dqk = q.shape
        self.Tc, self.H, self.Dqk = Tc, H, Dqk
        self.T = Tc + token_offset if total_tokens is None else total_tokens
        self.t0 = token_offset
        self.paged = kv.dim() == 4
        self.Hkv = kv.shape[-2]
        self.heads_per_kv = H // self.Hkv
        self.Dr = 0 if q_rope is None else q_rope.shape[-1]
        self.scale = float((Dqk + self.Dr) ** -0.5 if sm_scale is None else sm_scale)
        self.Dv = v.shape[-1] if v is not None else (Dqk if d_v is None else int(d_v))
        self.device = q.device
        self.compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.block_size = int(block_size)
        self.causal = bool(causal)
        self.G, self.K = indices.shape[1], indices.shape[2]
        if self.paged:
            self.num_pages, self.page_size = kv.shape[0], kv.shape[1]
            S = self.num_pages * self.page_size
            cap = block_table.shape[1] * self.page_size  # no sequence is longer than its table
        else:
            self.num_pages, self.page_size = 0, 0
            S = kv.shape[0]
            cap = S
        self.S = S
        # Offsets expanded per block: a block's kept positions lie in [j*b, L_b) with L_b <= cap, so
        # offsets past min(b, cap) are never kept. Expanding them all would make the work and memory
        # grow with K * block_size even over a tiny cache (block_size 2**20 over 64 rows).
        self.span = max(1, min(self.block_size, cap))
        self.n = self.K * self.span  # candidates expanded per token and kv head
        self.kv_flat = kv.reshape(S, self.Hkv, Dqk)
        self.v_flat = None if v is None else v.reshape(S, self.Hkv, self.Dv)
        self.kvr_flat = None if kv_rope is None else kv_rope.reshape(S, self.Hkv, self.Dr)
        # Quantized kv / v: their tile scales, flattened like the storage. Rows are dequantized after
        # they are gathered (_gather), so the extra memory is bounded by the selected rows.
        self.scale_block = int(scale_block)
        self.kvs_flat = None if kv_scale is None else kv_scale.reshape(S, self.Hkv, kv_scale.shape[-1])
        self.vs_flat = None if v_scale is None else v_scale.reshape(S, self.Hkv, v_scale.shape[-1])
        # Bytes of one stored value, the widest of the row's parts (bytes_per_candidate's bound).
        self.in_bytes = max(x.element_size() for x in (kv, v, kv_rope) if x is not None)
        self.block_table = block_table if self.paged else None
        self.sink = (None if attn_sink is None
                     else attn_sink.to(self.compute_dtype).reshape(1, self.Hkv, self.heads_per_kv, 1))
        # On the CPU a host-side test ("was anything dropped?") is free and lets the common case skip
        # two masking passes; elsewhere it would be a device sync, so always mask there. Tracing
        # (torch.compile, opcheck) must not see it either: plain tensors only.
        self.host = (self.device.type == "cpu" and type(q) is torch.Tensor
                     and not torch.compiler.is_compiling())
        if cu_seqlens_q is None and not self.paged and cu_seqlens_k is None:
            self.uniform = True  # one contiguous sequence: L = S, base = 0
            self.L, self.base, self.seq = S, 0, None
        else:
            self.uniform = False
            seq, L, q_pos, base = token_metadata(self.T, S, self.device, cu_seqlens_q, cu_seqlens_k,
                                                 seqlens_k if self.paged else None)
            r = slice(self.t0, self.t0 + Tc)
            self.seq, self.L, self._q_pos = seq[r], L[r], q_pos[r]
            self.base = None if base is None else base[r]

    def facts(self, c0: int, c1: int):
        """(L, q_pos, base, seq) for local tokens [c0, c1), broadcastable against [c, G, n]."""
        if self.uniform:
            q_pos = None
            if self.causal:
                t = torch.arange(self.t0 + c0, self.t0 + c1, device=self.device, dtype=torch.int64)
                q_pos = (t + (self.L - self.T))[:, None, None]
            return self.L, q_pos, self.base, None
        b3 = lambda x: x[c0:c1, None, None]  # noqa: E731
        return (b3(self.L), b3(self._q_pos) if self.causal else None,
                None if self.base is None else b3(self.base), self.seq[c0:c1])


def _select(call: _Call, idx: Tensor, c0: int, c1: int, r0: int = 0, r1: Optional[int] = None):
    """Storage rows [c, G, n] of the candidates of tokens [c0, c1) and the kept mask.

    With blocks, only offsets [r0, r1) of each block are expanded (default: the whole ``span``).

    Dropped candidates point at row 0 (never dereferenced as data: their rows are zeroed after the
    gather). The mask is ``None`` when nothing was dropped (known only on the CPU). Every product of
    an index is formed only after the index was found in range, so nothing can overflow.
    """
    L, q_pos, base, seq = call.facts(c0, c1)
    bs = call.block_size
    if call.host and call.uniform and bs == 1 and q_pos is None:
        # Decode fast path: one min/max read tells whether anything at all is dropped.
        if idx.numel() == 0:
            return idx, None
        lo, hi = torch.aminmax(idx)
        if int(lo) >= 0 and int(hi) < L:
            return idx, None
    if bs > 1:
        # Range-check the block index before multiplying: idx * block_size could overflow. Only the
        # first ``span`` offsets of a block can be kept (see _Call), so only those are expanded.
        idx = idx.to(torch.int64)
        keep = (idx >= 0) & (idx < (L + (bs - 1)) // bs) if bs <= call.span else (idx == 0) & (L > 0)
        idx = torch.where(keep, idx, 0)
        r = torch.arange(r0, call.span if r1 is None else r1, device=idx.device, dtype=torch.int64)
        pos = (idx[..., None] * bs + r).flatten(-2)
        keep = keep.repeat_interleave(r.numel(), dim=-1) & (pos < L)
    else:
        pos = idx
        keep = (idx >= 0) & (idx < L)
    if q_pos is not None:
        keep = keep & (pos <= q_pos)
    # (dropped positions are set to 0 before any row arithmetic below: nothing can overflow)
    if call.paged:
        pos = torch.where(keep, pos, 0).to(torch.int64)
        rows, ok = paged_rows(call.block_table[seq], pos.flatten(1), call.page_size, call.num_pages)
        rows = rows.view(pos.shape)
        # A table entry outside the cache is never dereferenced (its candidate is dropped instead).
        keep = keep & ok.view(pos.shape)
    elif isinstance(base, int) and base == 0:
        rows = pos
    else:
        rows = torch.where(keep, pos, 0) + base
        # Lengths past the cache (unchecked device metadata) drop the candidate, never read past S.
        keep = keep & (rows < call.S)
    if call.host and bool(keep.all()):
        return rows, None
    return torch.where(keep, rows, 0), keep


def paged_rows(table: Tensor, pos: Tensor, page_size: int, num_pages: int) -> Tuple[Tensor, Tensor]:
    """Storage rows of logical positions ``pos`` [c, m] through block-table rows ``table`` [c, max_pages].

    Returns (rows [c, m] int64, ok [c, m]): ``ok`` is False where the page entry is outside the cache
    (such a row is never to be read). Positions past the table read its last column; a table with no
    column at all (every sequence empty: a fresh ``PagedLatentCache``) reads as -1, i.e. no page.
    Shared by the attention and the indexer references.
    """
    table = table.to(torch.int64)
    if table.shape[1] == 0:
        table = torch.full((table.shape[0], 1), -1, dtype=torch.int64, device=table.device)
    page_idx = (pos // page_size).clamp_(max=table.shape[1] - 1)
    page = torch.gather(table, 1, page_idx)
    ok = (page >= 0) & (page < num_pages)
    return torch.where(ok, page, 0) * page_size + pos % page_size, ok


def _per_head(keep: Tensor, Hkv: int) -> Tensor:
    """[c, G, n] mask -> [c*Hkv, n] (G = 1: one selection shared by every kv head)."""
    c, G, n = keep.shape
    return (keep if G == Hkv else keep.expand(c, Hkv, n)).reshape(c * Hkv, n)


def _gather(storage: Tensor, rows: Tensor, keep: Optional[Tensor], dtype: torch.dtype,
            scale: Optional[Tensor] = None, scale_block: int = 0, out: Optional[Tensor] = None) -> Tensor:
    """storage [N, Hkv, D], rows/keep [c, G, n] -> [c*Hkv, n, D] in ``dtype``, dropped rows zeroed.

    A quantized storage comes with its tile scales ``scale`` [N, Hkv, ceil(D / scale_block)]: the
    gathered rows alone are dequantized (never the whole cache). ``out`` (a [c*Hkv, n, D] view of a
    wider buffer, last stride 1) receives the result instead of a new tensor.
    """
    c, G, n = rows.shape
    Hkv, D = storage.shape[1], storage.shape[2]
    if n == 0 or storage.shape[0] == 0:  # nothing selected, or a cache with no rows: nothing to read
        return storage.new_zeros((c * Hkv, n, D), dtype=dtype) if out is None else out.zero_()
    x = _take(storage, rows)
    if out is not None:
        x = out.copy_(x if scale is None else stored_values(x, dtype))  # the dtype conversion is the copy
    elif scale is not None:
        x = stored_values(x, dtype)
    elif x.dtype != dtype:
        x = x.to(dtype)
    if scale is not None:
        scale_tiles_(x, _take(scale, rows).to(dtype), scale_block)  # x is a fresh copy: in place
    if keep is not None:
        # Dropped candidates may point at garbage (NaN/inf in an unused page): zero their rows so
        # that 0-probability x value stays 0 and no NaN reaches a gradient either.
        x = x.masked_fill_(~_per_head(keep, Hkv)[..., None], 0.0)
    return x


def _take(storage: Tensor, rows: Tensor) -> Tensor:
    """storage [N, Hkv, D] at rows [c, G, n] -> [c*Hkv, n, D] in storage's dtype.

    Operands are kept 3-D ([token x kv head, ...]) so every product is one plain ``bmm``: torch.matmul's
    4-D broadcasting path and the reshapes around it cost ~3x more per call, which shows in decode.
    """
    c, G, n = rows.shape
    Hkv, D = storage.shape[1], storage.shape[2]
    if G == 1:
        # One selection shared by every kv head: one row gather serves them all.
        x = torch.index_select(storage, 0, rows.reshape(-1))
        return x.view(c, n, Hkv, D).transpose(1, 2).reshape(c * Hkv, n, D) if Hkv > 1 else x.view(c, n, D)
    # reshape, not view: advanced indexing lays the result out like ``rows``, which may be any
    # view of the caller's indices (e.g. a transposed topk whose K axis is not innermost).
    return storage[rows, torch.arange(Hkv, device=rows.device)[None, :, None]].reshape(c * Hkv, n, D)


def _rows(storage: Tensor, scale: Optional[Tensor], scale_block: int, u: Tensor, dtype: torch.dtype) -> Tensor:
    """Storage rows ``u`` [U] -> [U, Hkv, D] in ``dtype``, dequantized when ``scale`` is given."""
    x = storage[u]
    return x.to(dtype) if scale is None else scale_tiles_(stored_values(x, dtype), scale[u].to(dtype), scale_block)


def _union_rows(call: _Call, rows: Tensor, keep: Optional[Tensor], chunk_bytes: int, in_bytes: int) -> Optional[Tensor]:
    """Sorted distinct storage rows kept by a chunk, when attending over them densely is cheaper.

    In a prefill, neighbouring tokens select mostly the same positions (top-2048 of a 4K context):
    gathering K rows per token then multiplies [heads_per_kv, D] x [D, K] per token, which is bound by the
    gather's memory traffic. Over the chunk's union of rows instead, one gather serves every token
    and the GEMMs have c*heads_per_kv rows. Used on the CPU only (``unique`` is a host sync elsewhere) and
    when the union is at most half the candidates and its working set fits the chunk budget.
    """
    c, _, n = rows.shape
    if not call.host or c < 2 or n == 0 or call.S == 0:
        return None
    # A count per storage row (cheaper than torch.unique's sort): rows with a kept candidate.
    ones = torch.ones((), dtype=torch.int32).expand(rows.numel()) if keep is None else keep.reshape(-1).to(torch.int32)
    count = torch.zeros(call.S, dtype=torch.int32).index_add_(0, rows.reshape(-1), ones)
    u = count.nonzero().squeeze(1)
    U = u.numel()
    if U == 0 or 2 * U > c * n:
        return None
    # _chunk_union's working set: dense scores (+ rope scores) and weights [c, H, U], the gathered
    # candidate scores [c, H, n], the union rows (float32 + the low-precision copy), the inverse map.
    width = call.Dqk + call.Dr + (0 if call.v_flat is None else call.Dv)
    need = (c * call.H * (U * (3 if call.kvr_flat is not None else 2) + n) * 4
            + U * call.Hkv * width * (4 + in_bytes) + c * rows.shape[1] * n * 8)
    if need > chunk_bytes:
        return None
    return u


def _chunk_union(call: _Call, q, q_rope, c0, c1, rows, keep, u):
    """(out [c, Hkv, heads_per_kv, Dv], lse) of tokens [c0, c1) by dense scores over the union rows ``u``, or
    None when the union's value rows are not all finite (then the caller takes the gather path).

    Scores of each token's own candidates are gathered from the dense [c, Hkv, heads_per_kv, U] matrix (so
    duplicates and masks behave exactly as in the gather path), and the softmax weights are
    scattered back (``scatter_add_`` sums duplicates) before one [c*heads_per_kv, U] x [U, Dv] GEMM per kv head.
    That GEMM multiplies every token's weights with every union row, including the rows the token
    did not select (weight 0): 0 * NaN or 0 * inf would poison it (SPEC: a row a token did not select
    never influences it). Hence the finiteness check; the dense scores need none, since each token
    reads back only its own candidates' columns.
    """
    c, cd = c1 - c0, call.compute_dtype
    Hkv, heads_per_kv, D, Dv, U = call.Hkv, call.heads_per_kv, call.Dqk, call.Dv, u.numel()
    ku = _rows(call.kv_flat, call.kvs_flat, call.scale_block, u, cd)  # [U, Hkv, Dqk]
    vu = ku[..., :Dv] if call.v_flat is None else _rows(call.v_flat, call.vs_flat, call.scale_block, u, cd)
    if not bool(torch.isfinite(vu).all()):  # host-only path: free to read
        return None
    inv = torch.searchsorted(u, rows).clamp_(max=U - 1)  # dropped candidates: any column, masked below
    index = inv[:, :, None, :].expand(c, Hkv, heads_per_kv, rows.shape[2])

    def dense(xu, qx, width):  # [Hkv, c*heads_per_kv, U] scores of qx against the union rows xu [U, Hkv, width]
        qh = qx[c0:c1].to(cd).reshape(c, Hkv, heads_per_kv, width).transpose(0, 1).reshape(Hkv, c * heads_per_kv, width)
        return torch.bmm(qh * call.scale, xu.permute(1, 2, 0))

    sd = dense(ku, q, D)
    if call.kvr_flat is not None:
        sd = sd + dense(call.kvr_flat[u].to(cd), q_rope, call.Dr)
    s = torch.gather(sd.view(Hkv, c, heads_per_kv, U).transpose(0, 1), -1, index)
    if keep is not None:
        s = s.masked_fill_(~keep[:, :, None, :], float("-inf"))
    lse, e, _, denom = _softmax(call, s, _kept_rows(keep, s.shape))
    w = torch.zeros(c, Hkv, heads_per_kv, U, dtype=cd, device=e.device).scatter_add_(-1, index, e)
    o = torch.bmm(w.transpose(0, 1).reshape(Hkv, c * heads_per_kv, U), vu.transpose(0, 1))
    return o.view(Hkv, c, heads_per_kv, Dv).transpose(0, 1).div_(denom), lse


def _chunk_scores(call: _Call, q, q_rope, indices, c0, c1, selected=None):
    """Gathered operands and masked scores of tokens [c0, c1): s [c*Hkv, heads_per_kv, n] (scaled), keys/vals
    [c*Hkv, n, D], qc [c*Hkv, heads_per_kv, Dqk] (token x kv head folded into the bmm batch)."""
    whole = c0 == 0 and c1 == call.Tc  # one chunk (decode): skip the slicing
    if selected is None:
        selected = _select(call, indices if whole else indices[c0:c1], c0, c1)
    rows, keep = selected
    c, cd = c1 - c0, call.compute_dtype
    Dqk, Dr = call.Dqk, call.Dr
    qc = (q if whole else q[c0:c1]).reshape(c * call.Hkv, call.heads_per_kv, Dqk)
    kr = qr = None
    if call.kvr_flat is None:
        keys = _gather(call.kv_flat, rows, keep, cd, call.kvs_flat, call.scale_block)  # [c*Hkv, n, Dqk]
        if qc.dtype != cd:
            qc = qc.to(cd)
        s = torch.bmm(qc * call.scale, keys.transpose(1, 2))  # [c*Hkv, heads_per_kv, n]
    else:
        # A split rope part (a quantized cache keeps it apart, in higher precision): both parts are
        # gathered side by side into one [.., n, Dqk + Dr] buffer, so the scores are one bmm, not two
        # plus a sum over [c*Hkv, heads_per_kv, n]. keys / kr are views of it.
        both = torch.empty((c * call.Hkv, rows.shape[2], Dqk + Dr), dtype=cd, device=qc.device)
        keys = _gather(call.kv_flat, rows, keep, cd, call.kvs_flat, call.scale_block, out=both[..., :Dqk])
        kr = _gather(call.kvr_flat, rows, keep, cd, out=both[..., Dqk:])
        qr = q_rope[c0:c1].reshape(c * call.Hkv, call.heads_per_kv, Dr)
        q_both = torch.cat([qc, qr], dim=-1).to(cd)
        qc, qr = q_both[..., :Dqk], q_both[..., Dqk:]
        s = torch.bmm(q_both * call.scale, both.transpose(1, 2))
    if call.v_flat is None:
        vals = keys[..., :call.Dv] if call.Dv < call.Dqk else keys
    else:
        vals = _gather(call.v_flat, rows, keep, cd, call.vs_flat, call.scale_block)
    if keep is not None:
        s = s.masked_fill_(~_per_head(keep, call.Hkv)[:, None, :], float("-inf"))
    return dict(rows=rows, keep=keep, keys=keys, vals=vals, kr=kr, qc=qc, qr=qr, s=s,
                kept=_kept_rows(keep, s.shape))


def _kept_rows(keep: Optional[Tensor], shape) -> Optional[Tensor]:
    """Which rows of scores ``shape`` ([c*Hkv, heads_per_kv, n] or [c, Hkv, heads_per_kv, n]) keep a candidate, as a bool
    tensor broadcastable to ``shape[:-1] + (1,)``; None when nothing was dropped (then a row keeps
    all of its n candidates, so it is empty only when n = 0).

    Decided from the kept mask alone (indices, lengths, causality), never from score values.
    """
    if keep is None:
        return None
    any_kept = keep.any(dim=-1)  # [c, G]
    if len(shape) == 4:
        return any_kept[:, :, None, None]
    c, G = any_kept.shape
    Hkv = shape[0] // max(1, c)
    return any_kept.expand(c, Hkv).reshape(c * Hkv, 1, 1) if G != Hkv else any_kept.reshape(c * Hkv, 1, 1)


def _softmax(call: _Call, s: Tensor, kept: Optional[Tensor]):
    """Online-softmax pieces of masked scores s [c*Hkv, heads_per_kv, n] or [c, Hkv, heads_per_kv, n] (consumed
    in place).

    Returns (lse, e, l, denom): lse [.., 1] natural log (-inf for an empty row); e = exp(s - m) with
    m the row max (0 for an empty row, so e = 0 there, never NaN); l = sum(e); and the output
    denominator denom = l + exp(sink - m), so that out = (e @ v) / denom. ``kept`` (see _kept_rows)
    says which rows keep a candidate: only those are non-empty, whatever their scores. A kept row whose
    scores hold NaN or +inf, or are all -inf, keeps its max m and so gives NaN, exactly as the float64
    evaluation does (SPEC: NaN propagates). A non-empty finite row has l >= 1 (its max term is
    exp(0)), so clamping denom at 1 changes nothing there and turns an empty row's 0 / 0 into 0
    (clamp_min keeps NaN).
    """
    if s.shape[-1]:
        m = s.amax(dim=-1, keepdim=True)
        if kept is not None:
            m = torch.where(kept, m, 0.0)
    else:
        m = s.new_zeros((*s.shape[:-1], 1))
    e = s.sub_(m).exp_()
    l = e.sum(dim=-1, keepdim=True)
    lse = torch.log(l).add_(m)
    # (s is [c*Hkv, heads_per_kv, n] or [c, Hkv, heads_per_kv, n]: the sink [1, Hkv, heads_per_kv, 1]
    # meets m in the 4-D view)
    denom = l if call.sink is None else l + torch.exp(call.sink - m.view(-1, call.Hkv, call.heads_per_kv, 1)).view_as(m)
    if kept is not None or call.sink is not None or not s.shape[-1]:
        denom = denom.clamp_min(1.0)
    return lse, e, l, denom


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
    chunk_bytes: Optional[int] = None,
    token_offset: int = 0,
    total_tokens: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference forward. Returns ``(out [T, H, Dv] in q.dtype, lse [T, H] float32)``.

    ``q``, ``q_rope`` and ``indices`` may be a slice of the call's query tokens starting at global
    token ``token_offset`` out of ``total_tokens``. A quantized ``kv`` / ``v`` (float8_e4m3fn, int8)
    comes with ``kv_scale`` / ``v_scale``; only the rows a piece of work selects are dequantized.
    """
    if (q.shape[0] == 1 and kv.dim() == 3 and cu_seqlens_q is None and cu_seqlens_k is None
            and block_size == 1 and kv_scale is None and v_scale is None):
        res = _one_token(q, kv, indices, v, d_v, q_rope, kv_rope, sm_scale, causal, attn_sink, token_offset,
                         total_tokens)
        if res is not None:
            return res
    call = _Call(q, kv, indices, v, d_v, q_rope, kv_rope, sm_scale, block_size, cu_seqlens_q, cu_seqlens_k,
                 block_table, seqlens_k, causal, attn_sink, token_offset, total_tokens, kv_scale, v_scale,
                 scale_block)
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    Tc, H, Dv, K = call.Tc, call.H, call.Dv, call.K
    scales = sum(x.shape[-1] for x in (kv_scale, v_scale) if x is not None)
    per_cand = bytes_per_candidate(H, call.Hkv, call.Dqk + call.Dr + (0 if v is None else Dv), call.G,
                                   call.in_bytes, q_rope is not None, scales)
    chunk = max(1, budget // max(1, call.n * per_cand))
    # A piece: all K indices of `chunk` tokens; when one token's candidates exceed the budget, one
    # token and `k_piece` of its indices; when even one index (a block of `span` positions) exceeds
    # it, one index and `r_piece` offsets of its block.
    k_piece, r_piece = K, call.span
    if call.n * per_cand > budget:
        k_piece = max(1, budget // (per_cand * call.span))
        r_piece = call.span if per_cand * call.span <= budget else max(1, budget // per_cand)
    if chunk >= Tc and k_piece >= K:  # one piece (decode): no output buffer, no copy
        o, lse = _forward_piece(call, q, q_rope, indices, 0, Tc, budget, call.in_bytes)
        o = o.reshape(Tc, H, Dv)
        return (o if o.dtype == q.dtype else o.to(q.dtype)), lse.reshape(Tc, H).to(torch.float32)
    out = torch.empty((Tc, H, Dv), dtype=q.dtype, device=q.device)
    lse_out = torch.empty((Tc, H), dtype=torch.float32, device=q.device)
    for c0 in range(0, Tc, chunk):
        c1 = min(Tc, c0 + chunk)
        if k_piece >= K:
            o, lse = _forward_piece(call, q, q_rope, indices[c0:c1], c0, c1, budget, call.in_bytes)
        else:
            o, lse = _forward_split_k(call, q, q_rope, indices[c0:c1], c0, c1, k_piece, r_piece)
        out[c0:c1] = o.reshape(c1 - c0, H, Dv)
        lse_out[c0:c1] = lse.reshape(c1 - c0, H)
    return out, lse_out


# PyTorch's CPU flash-attention kernel: softmax(scale * q k^T) v and its logsumexp in one call. Private
# (aten::_...), so it may be missing from a torch version (then every call takes the general path),
# and it trusts its caller: it reads garbage when a last dimension is strided, divides by zero on
# zero keys, and wants q, k and v of one width. `_one_token` gives it only what it handles.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU = None if _FLASH_CPU is None else _FLASH_CPU.default


def _one_token(q, kv, indices, v, d_v, q_rope, kv_rope, sm_scale, causal, attn_sink, token_offset, total_tokens):
    """(out, lse) of a call of one query token over one contiguous sequence with token selection, when
    no candidate is dropped; None otherwise (the caller takes the general path).

    A decode step calls the op once per layer, so this path is about per-call cost, not FLOPs: the
    general path's ~25 small torch ops (selection masks, chunking, an online softmax by hand) cost
    several times the attention itself at decode sizes. Here the rows are gathered by
    ``index_select``, whose own range check proves that every candidate is kept (a dropped one raises
    before anything is read, and the general path takes over), and one flash-attention call returns
    out and lse together. Same contract, same float32 (float64 for float64 q) compute. Every
    conversion below runs only when needed: at decode sizes each torch call costs as much as the math.
    """
    S, Hkv, Dqk = kv.shape
    G, K = indices.shape[1], indices.shape[2]
    if (_FLASH_CPU is None or K == 0 or not q.is_cpu or type(q) is not torch.Tensor
            or torch.compiler.is_compiling()):
        return None
    if torch.is_grad_enabled() and _needs_grad(q, kv, v, q_rope, kv_rope, attn_sink):
        return None  # python_ref called directly under autograd: the general path differentiates
    Dk = Dqk if q_rope is None else Dqk + q_rope.shape[-1]
    if v is not None and v.shape[-1] != Dk:
        return None  # the kernel wants values as wide as the keys
    # Kept = 0 <= index < end: end = L (= S), or with causal q_pos + 1 = L - T + t + 1 (SPEC section 1).
    T = token_offset + 1 if total_tokens is None else total_tokens
    end = S - (T - 1 - token_offset) if causal else S
    if G != 1:  # per-kv-head selections: advanced indexing wraps negatives, so check the range first
        lo, hi = torch.aminmax(indices)
        if int(lo) < 0 or int(hi) >= end:
            return None
        heads = torch.arange(Hkv)[:, None]
    elif end <= 0:
        return None
    else:
        rows = indices.reshape(K)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32

    def gather(x):  # [S, Hkv, D] -> [1, Hkv, K, D] in cd, last dimension dense
        if G == 1:  # one selection shared by every kv head; index_select raises for rows outside [0, end)
            x = torch.index_select(x if end == S else x[:end], 0, rows)
            x = x.view(1, 1, K, x.shape[-1]) if Hkv == 1 else x.transpose(0, 1)[None]
        else:
            x = x[indices[0], heads][None]
        return x if x.dtype == cd else x.to(cd)

    try:
        keys = gather(kv)
    except IndexError:  # a dropped candidate (negative, past the sequence, or after the query)
        return None
    qx = q
    if q_rope is not None:
        keys, qx = torch.cat((keys, gather(kv_rope)), -1), torch.cat((q, q_rope), -1)
    vals = keys if v is None else gather(v)  # latent: value = the first Dv columns of the key row
    if qx.dtype != cd:
        qx = qx.to(cd)
    if qx.stride(-1) != 1:
        qx = qx.contiguous()
    H = q.shape[1]
    scale = Dk ** -0.5 if sm_scale is None else float(sm_scale)
    o, lse = _FLASH_CPU(qx.reshape(1, Hkv, H // Hkv, Dk), keys, vals, 0.0, False, scale=scale)
    # (reshape: a copy when Hkv > 1, since the kernel returns its outputs with [B, L, heads] strides)
    o, lse = o.reshape(1, H, Dk), lse.reshape(1, H)
    if attn_sink is not None:  # exp(s) / (exp(lse) + exp(sink)) = softmax * sigmoid(lse - sink)
        o = o * torch.sigmoid(lse - attn_sink.to(cd))[..., None]
    Dv = Dk if v is not None else (Dqk if d_v is None else int(d_v))
    if Dv < Dk:
        o = o[..., :Dv].contiguous()
    return (o if o.dtype == q.dtype else o.to(q.dtype)), (lse if cd == torch.float32 else lse.to(torch.float32))


def _needs_grad(*xs) -> bool:
    for x in xs:
        if x is not None and x.requires_grad:
            return True
    return False


def _forward_piece(call: _Call, q, q_rope, idx, c0, c1, budget, in_bytes):
    """(out, lse) of tokens [c0, c1) over their candidates ``idx`` [c, G, k]: the union or gather path."""
    selected = _select(call, idx, c0, c1)
    u = _union_rows(call, *selected, budget, in_bytes)
    res = None if u is None else _chunk_union(call, q, q_rope, c0, c1, *selected, u)
    if res is not None:
        return res
    x = _chunk_scores(call, q, q_rope, idx, c0, c1, selected)
    lse, e, _, denom = _softmax(call, x["s"], x["kept"])
    return torch.bmm(e, x["vals"]).div_(denom), lse  # [c*Hkv, heads_per_kv, Dv]


def _forward_split_k(call: _Call, q, q_rope, idx, c0, c1, k_piece, r_piece):
    """(out, lse) of tokens [c0, c1) whose K indices are taken ``k_piece`` at a time, and each block's
    ``span`` offsets ``r_piece`` at a time (gather path).

    Each slice gives a part (o_i = softmax-weighted values over its kept candidates, no sink; lse_i);
    parts merge as in docs/spec.md section 6: lse = log sum exp(lse_i), out = sum exp(lse_i - lse) o_i, then
    the sink scales out by exp(lse) / (exp(lse) + exp(sink)). A part without a kept candidate
    (lse_i = -inf) adds nothing; a NaN part makes lse and out NaN, as the one-piece path does.
    """
    o_run = lse_run = None
    pieces = ((j0, r0) for j0 in range(0, call.K, k_piece) for r0 in range(0, call.span, r_piece))
    for j0, r0 in pieces:
        sel = _select(call, idx[:, :, j0:j0 + k_piece], c0, c1, r0, min(call.span, r0 + r_piece))
        x = _chunk_scores(call, q, q_rope, None, c0, c1, sel)
        lse_i, e, l, _ = _softmax(call, x["s"], x["kept"])
        o_i = torch.bmm(e, x["vals"]).div_(l.clamp_min(1.0))  # an empty part: 0 / 0 -> 0
        if o_run is None:
            o_run, lse_run = o_i, lse_i
            continue
        lse_new = torch.logaddexp(lse_run, lse_i)
        w_run = torch.where(torch.isneginf(lse_run), 0.0, torch.exp(lse_run - lse_new))
        w_i = torch.where(torch.isneginf(lse_i), 0.0, torch.exp(lse_i - lse_new))
        o_run = o_run * w_run + o_i * w_i
        lse_run = lse_new
    if call.sink is not None:
        sink = call.sink.reshape(1, call.Hkv, call.heads_per_kv, 1).expand(c1 - c0, -1, -1, -1).reshape(lse_run.shape)
        o_run = o_run / (1.0 + torch.exp(sink - lse_run))  # lse = -inf: o is 0 and stays 0
    return o_run, lse_run


def max_logits(
    q: Tensor, kv: Tensor, indices: Tensor, *, q_rope: Optional[Tensor] = None, kv_rope: Optional[Tensor] = None,
    sm_scale: Optional[float] = None, block_size: int = 1, cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
    causal: bool = False, kv_scale: Optional[Tensor] = None, scale_block: int = 128,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Row max over kept candidates of the scaled logit s_p (SPEC section 1): [T, H] float32, -inf if none kept.

    The contract returns lse only; vendor APIs that also return the max (FlashMLA's max_logits,
    torch_npu's softmax_max) get it here, from the same candidate selection and scoring as the
    forward (one implementation of the keep rules), chunk by chunk on the inputs' device. It costs
    about as much as a reference forward pass.
    """
    call = _Call(q, kv, indices, None, None, q_rope, kv_rope, sm_scale, block_size, cu_seqlens_q, cu_seqlens_k,
                 block_table, seqlens_k, causal, None, 0, None, kv_scale, None, scale_block)
    T, H = q.shape[0], q.shape[1]
    if call.n == 0 or T == 0:
        return torch.full((T, H), float("-inf"), device=q.device, dtype=torch.float32)
    chunk = tokens_per_chunk(H, call.Hkv, call.n, call.Dqk + call.Dr, chunk_bytes)
    parts = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        s = _chunk_scores(call, q, q_rope, indices, c0, c1)["s"]  # [c*Hkv, heads_per_kv, n], dropped = -inf
        parts.append(s.amax(dim=-1).reshape(c1 - c0, H).to(torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def selective_attention_backward(
    grad_out: Optional[Tensor],
    grad_lse: Optional[Tensor],
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
    chunk_bytes: Optional[int] = None,
    out: Optional[Tensor] = None,
    lse: Optional[Tensor] = None,
):
    """Gradients ``(dq, dkv, dv, dq_rope, dkv_rope, dattn_sink)`` of (out, lse), chunk by chunk.

    With P = softmax over kept candidates and P' = exp(s) / (exp(lse) + exp(sink)) the weights
    that produced out = P' @ V (P' = P without a sink), the usual attention backward applies:
    dS = P' * (dO @ V^T - rowsum(dO * out)) + dlse * P;  dq = scale * dS @ K;
    dK = scale * dS^T @ q;  dV = P'^T @ dO;  dsink = -sum_t rowsum(dO * out) * exp(sink) / (exp(lse) + exp(sink)).
    Key/value rows are scattered back into the cache with ``index_put_(accumulate=True)``;
    dropped candidates have P = 0 and contribute exactly nothing. Entries for absent inputs are None.

    ``out`` and ``lse``, the forward's results (the op saves them), spare the backward the forward's
    softmax and its P' @ V: P = exp(s - lse) and P' = P * sigmoid(lse - sink). Without them both are
    recomputed from the scores, which the backward computes either way.

    A quantized ``kv`` / ``v`` (given with its scale) is storage, not a parameter: its gradient is None
    (docs/contract.md); the other inputs' gradients flow through its dequantized values.
    """
    call = _Call(q, kv, indices, v, d_v, q_rope, kv_rope, sm_scale, block_size, cu_seqlens_q, cu_seqlens_k,
                 block_table, seqlens_k, causal, attn_sink, 0, None, kv_scale, v_scale, scale_block)
    grads = _Grads(call, q, v, q_rope, kv_scale, v_scale)
    chunk = tokens_per_chunk(call.H, call.Hkv, call.n, call.Dqk + call.Dr + (0 if v is None else call.Dv),
                             chunk_bytes)
    for c0 in range(0, call.Tc, chunk):
        c1 = min(call.Tc, c0 + chunk)
        x = _chunk_scores(call, q, q_rope, indices, c0, c1)
        p, pp, sink_share = _backward_weights(call, x, lse, c0, c1)
        ds, dvals = _score_grads(call, x, p, pp, sink_share, grad_out, grad_lse, out, c0, c1, grads)
        kept_h = None if x["keep"] is None else _per_head(x["keep"], call.Hkv)[:, :, None]  # [c*Hkv, n, 1]
        if kept_h is not None:
            # A dropped candidate contributes exactly nothing: mask its terms rather than trust a zero
            # weight, since 0 * NaN (a NaN query, grad_out or kept value elsewhere in the row) is NaN
            # and its gradient row would land on storage row 0, which the token never selected.
            ds = ds.masked_fill(~kept_h.transpose(1, 2), 0.0)
            if dvals is not None:
                dvals = dvals.masked_fill(~kept_h, 0.0)
        _input_grads(call, x, ds, dvals, kept_h, c0, c1, grads)
    return grads.result(q, kv, v, q_rope, kv_rope, attn_sink)


class _Grads:
    """The backward's accumulators, in the compute dtype and shaped like the (flattened) inputs. None for
    an absent input, and for a quantized kv / v: storage, not a parameter (docs/contract.md)."""

    def __init__(self, call: _Call, q, v, q_rope, kv_scale, v_scale):
        zeros = lambda shape: torch.zeros(shape, device=q.device, dtype=call.compute_dtype)  # noqa: E731
        self.dq = zeros(q.shape)
        self.dkv = None if kv_scale is not None else zeros(call.kv_flat.shape)
        self.dv = None if v is None or v_scale is not None else zeros(call.v_flat.shape)
        self.dqr = None if q_rope is None else zeros(q_rope.shape)
        self.dkvr = None if call.kvr_flat is None else zeros(call.kvr_flat.shape)
        self.dsink = None if call.sink is None else zeros((1, call.Hkv, call.heads_per_kv, 1))
        # The values' gradient lands in dkv's first Dv columns (latent) or in dv (separate v).
        self.dvalues = self.dkv if v is None else self.dv
        self.Hkv = call.Hkv
        self.heads = torch.arange(call.Hkv, device=q.device)[None, :, None]

    def scatter(self, dst, rows, val):
        """Add val [c*Hkv, n, D] into dst [S, Hkv, D] at (rows, kv head); duplicates accumulate."""
        if dst is None or dst.shape[0] == 0 or rows.numel() == 0:  # None: a quantized kv / v
            return  # a cache with no rows (every candidate dropped) or nothing selected
        val = val.view(rows.shape[0], self.Hkv, rows.shape[2], val.shape[-1])
        r = rows.expand(rows.shape[0], self.Hkv, rows.shape[2])
        dst.index_put_((r, self.heads.expand_as(r)), val, accumulate=True)

    def result(self, q, kv, v, q_rope, kv_rope, attn_sink):
        """``(dq, dkv, dv, dq_rope, dkv_rope, dattn_sink)`` in the inputs' shapes and dtypes."""
        return (
            self.dq.to(q.dtype),
            None if self.dkv is None else self.dkv.reshape(kv.shape).to(kv.dtype),
            None if self.dv is None else self.dv.reshape(v.shape).to(v.dtype),
            None if q_rope is None else self.dqr.to(q_rope.dtype),
            None if kv_rope is None else self.dkvr.reshape(kv_rope.shape).to(kv_rope.dtype),
            None if attn_sink is None else self.dsink.reshape(attn_sink.shape).to(attn_sink.dtype),
        )


def _backward_weights(call: _Call, x, lse: Optional[Tensor], c0: int, c1: int):
    """(P, P', sink_share) of tokens [c0, c1), each [c*Hkv, heads_per_kv, n | 1]: P = softmax over the kept
    candidates (d lse / d s), P' the weights that produced out, sink_share = exp(sink) / (exp(lse) +
    exp(sink)) (None without a sink). From the forward's ``lse`` when given, else from the scores."""
    Hkv, heads_per_kv, c = call.Hkv, call.heads_per_kv, c1 - c0
    if lse is None:
        _, e, l, denom = _softmax(call, x["s"], x["kept"])
        pp = e / denom  # P' = the weights that produced out (sink included)
        p = e / l.clamp_min(1.0)  # P = softmax over the kept candidates alone (d lse / d s)
        sink_share = None if call.sink is None else 1 - l / denom  # exp(sink) / (exp(lse) + exp(sink))
        return p, pp, sink_share
    row_lse = lse[c0:c1].to(call.compute_dtype).reshape(c * Hkv, heads_per_kv, 1)
    # An empty row (lse = -inf, every s = -inf) subtracts 0 instead: P = 0 there, never NaN.
    p = torch.exp(x["s"] - (row_lse if x["kept"] is None else torch.where(x["kept"], row_lse, 0.0)))
    if call.sink is None:
        return p, p, None
    sink_share = torch.sigmoid(call.sink.view(1, Hkv, heads_per_kv, 1) - row_lse.view(c, Hkv, heads_per_kv, 1))
    sink_share = sink_share.view(c * Hkv, heads_per_kv, 1)
    return p, p * (1 - sink_share), sink_share


def _score_grads(call: _Call, x, p, pp, sink_share, grad_out, grad_lse, out, c0: int, c1: int, grads: _Grads):
    """(dS * scale, dV) of tokens [c0, c1): dS = P' * (dO @ V^T - rowsum(dO * out)) + dlse * P, dV = P'^T @ dO
    (None when the values take no gradient). Adds the sink's share to ``grads.dsink``."""
    Hkv, heads_per_kv, Dv, c, cd = call.Hkv, call.heads_per_kv, call.Dv, c1 - c0, call.compute_dtype
    vals = x["vals"]
    if grad_out is not None:
        do = grad_out[c0:c1].to(cd).reshape(c * Hkv, heads_per_kv, Dv)
        o = torch.matmul(pp, vals) if out is None else out[c0:c1].to(cd).reshape(c * Hkv, heads_per_kv, Dv)
        delta = (do * o).sum(-1, keepdim=True)
        ds = pp * (torch.matmul(do, vals.transpose(-1, -2)) - delta)
        dvals = None if grads.dvalues is None else torch.matmul(pp.transpose(-1, -2), do)
        if grads.dsink is not None:
            # d out / d sink = -out * exp(sink) / (exp(lse) + exp(sink))
            grads.dsink -= (delta * sink_share).view(c, Hkv, heads_per_kv, 1).sum(0, keepdim=True)
    else:
        ds = torch.zeros_like(p)
        dvals = None
    if grad_lse is not None:
        gl = grad_lse[c0:c1].to(cd).reshape(c * Hkv, heads_per_kv, 1)
        if x["kept"] is not None:  # an empty row's lse is the constant -inf
            gl = torch.where(x["kept"], gl, 0.0)
        ds = ds + gl * p
    return ds * call.scale, dvals


def _input_grads(call: _Call, x, ds, dvals, kept_h, c0: int, c1: int, grads: _Grads) -> None:
    """dq = dS @ K, dK = dS^T @ q (+ dV in a latent row's first Dv columns), the rope parts alike, for
    tokens [c0, c1); key/value gradients scattered into the cache rows the tokens selected."""
    c, H, Dv = c1 - c0, call.H, call.Dv
    grads.dq[c0:c1] = torch.matmul(ds, x["keys"]).reshape(c, H, call.Dqk)
    if grads.dkv is not None:
        dkeys = torch.matmul(ds.transpose(-1, -2), x["qc"])  # [c*Hkv, n, Dqk]
        if kept_h is not None:
            dkeys = dkeys.masked_fill_(~kept_h, 0.0)
        if dvals is not None and call.v_flat is None:
            dkeys[..., :Dv] += dvals
        grads.scatter(grads.dkv, x["rows"], dkeys)
    if dvals is not None and call.v_flat is not None:
        grads.scatter(grads.dv, x["rows"], dvals)
    if grads.dqr is not None:
        grads.dqr[c0:c1] = torch.matmul(ds, x["kr"]).reshape(c, H, call.Dr)
        dkr = torch.matmul(ds.transpose(-1, -2), x["qr"])
        grads.scatter(grads.dkvr, x["rows"], dkr if kept_h is None else dkr.masked_fill_(~kept_h, 0.0))


def selective_attention_dense(
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
    dtype: torch.dtype = torch.float64,
) -> Tuple[Tensor, Tensor]:
    """The oracle: docs/spec.md section 1 evaluated densely in ``dtype`` (float64 by default).

    For every query, a multiplicity count C[p] of each logical position p of its sequence is built
    from the candidate multiset; then lse = log sum_p C[p] exp(s_p) and
    out = sum_p C[p] exp(s_p) v_p / (exp(lse) [+ exp(sink)]). Only positions < L_b are read, with
    plain Python loops over sequences: slow, simple, and independent of the gather formulation.
    A quantized kv / v is dequantized in ``dtype`` first (the whole cache: the oracle is for tests).
    Returns ``(out, lse)`` in ``dtype`` on the CPU.
    """
    cpu = torch.device("cpu")
    f = lambda x: None if x is None else x.to(cpu, dtype)  # noqa: E731  (autograd flows: grads can be checked)

    def values(x, scale):  # a quantized tensor's values: float(stored) * scale of its tile, in dtype
        return f(x) if scale is None else dequantize(x.detach().to(cpu), scale.detach().to(cpu), scale_block, dtype)

    qd, kvd, vd, qr, kvr = f(q), values(kv, kv_scale), None if v is None else values(v, v_scale), f(q_rope), f(kv_rope)
    idx = indices.detach().to(cpu, torch.int64)
    T, H, Dqk = qd.shape
    Hkv = kvd.shape[-2]
    heads_per_kv = H // Hkv
    Dr = 0 if qr is None else qr.shape[-1]
    scale = (Dqk + Dr) ** -0.5 if sm_scale is None else float(sm_scale)
    Dv = vd.shape[-1] if vd is not None else (Dqk if d_v is None else int(d_v))
    sink = None if attn_sink is None else f(attn_sink)

    out = torch.zeros(T, H, Dv, dtype=dtype)
    lse = torch.full((T, H), float("-inf"), dtype=dtype)
    for tokens, Lb, seq_rows in _dense_sequences(T, kvd, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k):
        keys = seq_rows(kvd)  # [Lb, Hkv, Dqk]: logical positions 0..Lb-1
        vals = keys[..., :Dv] if vd is None else seq_rows(vd)
        kr = None if kvr is None else seq_rows(kvr)
        for t in tokens:
            q_pos = Lb - len(tokens) + (t - tokens.start)  # a sequence's queries are its last positions
            for g in range(Hkv):
                j = idx[t, g if idx.shape[1] == Hkv else 0]  # shared indices: one row for every kv head
                count = _multiplicity(j, Lb, block_size, q_pos if causal else None).to(dtype)
                sel = count > 0
                if not bool(sel.any()):
                    continue  # out 0, lse -inf
                for h in range(g * heads_per_kv, (g + 1) * heads_per_kv):
                    s = scale * (keys[sel, g] @ qd[t, h])
                    if kr is not None:
                        s = s + scale * (kr[sel, g] @ qr[t, h])
                    out[t, h], lse[t, h] = _weighted_softmax(s, count[sel], vals[sel, g],
                                                             None if sink is None else sink[h])
    return out, lse


def _dense_sequences(T: int, kvd: Tensor, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k):
    """The oracle's sequences: per sequence, ``(range of its query tokens, L_b, rows)`` where ``rows(x)``
    reads logical positions 0..L_b-1 of a storage laid out like ``kvd`` (contiguous or paged)."""
    i64 = lambda x: x.detach().to("cpu", torch.int64)  # noqa: E731
    cq = [0, T] if cu_seqlens_q is None else i64(cu_seqlens_q).tolist()
    B = len(cq) - 1
    seqs = []
    if kvd.dim() == 4:  # paged: position p of sequence b is row p % page of page table[b, p // page]
        lens, table, page = i64(seqlens_k).tolist(), i64(block_table), kvd.shape[1]
        for b in range(B):
            p = torch.arange(lens[b])
            seqs.append((range(cq[b], cq[b + 1]), lens[b], lambda x, b=b, p=p: x[table[b, p // page], p % page]))
    else:
        ck = [0, kvd.shape[0]] if cu_seqlens_k is None else i64(cu_seqlens_k).tolist()
        for b in range(B):
            seqs.append((range(cq[b], cq[b + 1]), ck[b + 1] - ck[b], lambda x, b=b: x[ck[b]:ck[b + 1]]))
    return seqs


def _multiplicity(j: Tensor, Lb: int, block_size: int, q_pos: Optional[int]) -> Tensor:
    """C[p], p < Lb: how many times position p is a kept candidate of the index row ``j`` (int64):
    index i covers positions [i*block_size, (i+1)*block_size); kept when 0 <= p < Lb (and p <= q_pos
    with causality, ``q_pos`` None without)."""
    j = j[(j >= 0) & (j <= Lb // block_size)]  # beyond that, every position is >= Lb
    # offsets past L_b are never kept: expand at most L_b of them (block_size may be huge)
    p = (j[:, None] * block_size + torch.arange(min(block_size, Lb))).flatten()
    p = p[(p < Lb) & ((p <= q_pos) if q_pos is not None else True)]
    return torch.bincount(p, minlength=Lb)


def _weighted_softmax(s: Tensor, w: Tensor, vals: Tensor, sink: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out, lse) of one query head: lse = log sum_p w_p exp(s_p), out = sum_p w_p exp(s_p) v_p / (exp(lse)
    [+ exp(sink)]), shifted by the max score for range."""
    m = s.max()
    e = w * torch.exp(s - m)
    z = e.sum()
    denom = z + (torch.exp(sink - m) if sink is not None else 0.0)
    return (e @ vals) / denom, m + torch.log(z)
