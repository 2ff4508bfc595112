"""Selection (docs/spec.md section 2) in pure PyTorch: the DeepSeek-V3.2 lightning indexer and top-k.

    I[t, s] = sum_j weights[t, j] * relu(scale * q_idx[t, j] . k_idx[s]),   scale default Di ** -0.5

The production functions and their float64 oracles live here:

* :func:`lightning_indexer` - the [T, W] float32 score matrix, -inf where the position is not a
  valid key of the query (past its sequence, or after it with ``causal``).
* :func:`topk_indices` - [T, 1, k] int32: valid positions first, in descending score order, ties to
  the lower position, -1 padding.
* :func:`select` - the fused path: indexer + top-k streamed over chunks of keys with a running top-k
  merge. It never builds the [T, W] matrix; its working set is ``chunk_bytes`` whatever T and W.
* :func:`block_scores` - NSA-style block scores ("max" or "mean" over the valid positions of each
  block of ``block_size`` positions), so ``topk_indices(block_scores(...))`` gives block indices for
  ``selective_attention(block_size=b)``; ``select(block_size=b)`` fuses the same thing.
* ``*_dense`` - the oracles: float64, plain loops over sequences and tokens, a stable sort for the
  order. Written independently of the chunked code so that a shared mistake is unlikely.

Exact ordering without ties ambiguity: every (score, position) pair is packed into one int64 whose
integer order is "higher score first, then lower position first" (:func:`pack_keys`). Then the
plain ``torch.topk`` over int64 has no ties at all, and the running merge of the fused path is exact:
``topk(cat(best_so_far, chunk))`` can never pick a different element among equal scores. The CUDA
kernel uses the same packing (csrc/cuda/topk.cuh), so every backend agrees bit for bit.

Arguments are trusted here (``attention.select`` and friends validate, with errors naming the
argument). Nothing here syncs with the device except when ``max_seqlen_k`` is None and the tensors
are not on the CPU (the width W then needs one host read of the lengths), which docs/spec.md allows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .selective_attention import paged_rows, token_metadata

__all__ = ["lightning_indexer", "topk_indices", "select", "block_scores", "pack_keys", "unpack_positions",
           "score_width", "lightning_indexer_dense", "topk_indices_dense", "block_scores_dense",
           "select_dense", "SELECT_CHUNK_BYTES", "BLOCK_REDUCES",
           # building blocks the Triton selection launcher and attention.distributed reuse
           "INVALID_KEY_MAX", "best_positions", "reduce_blocks"]

# Working set of one (query chunk x key chunk) step of the fused select: the [c, Hi, w] logits, the
# [c, w] scores and the packed [c, k + w] merge buffer. 64 MiB keeps the 2048 x 65536 benchmark
# (score matrix alone 512 MiB) far under its 256 MiB extra-memory target while the matmuls stay big
# enough ([c * Hi, Di] x [Di, w] with c*Hi ~ 1000s) to run near peak on the CPU.
SELECT_CHUNK_BYTES = 64 << 20

BLOCK_REDUCES = ("max", "mean")

# float32 -inf as the signed, order-preserving int32 of pack_keys: every packed key at or below
# (_KEY_NEG_INF << 32) | 0xffffffff is an invalid (-inf or NaN) entry. Public: kernels that merge
# packed keys themselves (the Triton select) test validity against the same bound.
_KEY_NEG_INF = -2139095041  # 0xff800000 ^ 0x7fffffff as int32
_LOW = (1 << 32) - 1
INVALID_KEY_MAX = _KEY_NEG_INF * (1 << 32) + _LOW


# ----------------------------------------------------------------------------- packing
def pack_keys(scores: Tensor, positions: Tensor) -> Tensor:
    """int64 keys ordered as (score descending, position ascending) under plain integer order.

    High 32 bits: the float32 score's bits made order-preserving as a signed int (negative floats
    have their 31 magnitude bits flipped); NaN counts as -inf and -0.0 as +0.0, so equal scores
    really are equal. Low 32 bits: 0xffffffff - position, so the lower position is the larger key.
    """
    s = scores.to(torch.float32)
    s = torch.where(torch.isnan(s), float("-inf"), s) + 0.0  # + 0.0 turns -0.0 into +0.0
    b = s.view(torch.int32)
    k32 = torch.bitwise_xor(b, torch.bitwise_and(b >> 31, 0x7FFFFFFF)).to(torch.int64)
    return k32 * (1 << 32) + (_LOW - positions.to(torch.int64))


def unpack_positions(keys: Tensor) -> Tensor:
    """Positions of packed keys as int32, -1 where the score was -inf (or NaN)."""
    pos = _LOW - torch.bitwise_and(keys, _LOW)
    return torch.where(keys > INVALID_KEY_MAX, pos, -1).to(torch.int32)


def best_positions(keys: Tensor, k: int) -> Tensor:
    """[T, n] packed keys (any order) -> [T, 1, k] int32 positions, best first, -1 padded.

    The last step of every top-k here; public so that other implementations that produce packed
    keys (the Triton select's per-split candidates, the context-parallel merge) finish identically.
    """
    T, n = keys.shape
    kk = min(k, n)
    if kk > 0:
        keys = torch.topk(keys, kk, dim=1, largest=True, sorted=True).values
        pos = unpack_positions(keys)
    else:
        pos = keys.new_empty(T, 0, dtype=torch.int32)
    if kk < k:
        pos = torch.cat([pos, pos.new_full((T, k - kk), -1)], dim=1)
    return pos.view(T, 1, k)


# ----------------------------------------------------------------------------- shared pieces
def score_width(k_idx: Tensor, cu_seqlens_k: Optional[Tensor], seqlens_k: Optional[Tensor],
                max_seqlen_k: Optional[int]) -> int:
    """W of the score matrix: ``max_seqlen_k`` when given, else the longest sequence (host read)."""
    if max_seqlen_k is not None:
        return int(max_seqlen_k)
    if seqlens_k is not None:
        return int(seqlens_k.max()) if seqlens_k.numel() else 0
    if cu_seqlens_k is not None:
        return int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
    return k_idx.shape[0]


class _Indexer:
    """Per-call constants and the scores of one (query chunk x position chunk) tile."""

    def __init__(self, q_idx, k_idx, weights, scale, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k,
                 max_seqlen_k, causal, q_idx_scale=None, k_idx_scale=None, cu_seqlen_ks=None, cu_seqlen_ke=None):
        T, Hi, Di = q_idx.shape
        self.T, self.Hi, self.Di = T, Hi, Di
        self.device = q_idx.device
        self.cd = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
        self.scale = float(Di ** -0.5 if scale is None else scale)
        self.paged = k_idx.dim() == 3
        # Upcast once: bfloat16 matmuls run ~400x slower than float32 on our CPUs (docs/traps.md).
        # A quantized q_idx is dequantized here (it is [T, Hi, Di], as small as the scores' rows).
        q = q_idx.to(self.cd) * self.scale  # scale folded into q: one pass
        if q_idx_scale is not None:
            q = q * q_idx_scale.reshape(T, Hi).to(self.cd)[..., None]  # [T, Hi] or [T, Hi, 1]
        self.q = q.contiguous()
        self.w = weights.to(self.cd)
        if self.paged:
            self.P, self.page = k_idx.shape[0], k_idx.shape[1]
            self.k_flat = k_idx.reshape(self.P * self.page, Di)
        else:
            self.k_flat = k_idx
        # A quantized k_idx is dequantized per tile, after its rows are gathered (never the whole cache).
        self.k_scale = None if k_idx_scale is None else k_idx_scale.reshape(-1)
        # Per-token key windows [ks, ke) (vLLM / DeepGEMM's cu_seqlen_ks / cu_seqlen_ke), as positions.
        self.window = None if cu_seqlen_ks is None else (cu_seqlen_ks.to(torch.int64), cu_seqlen_ke.to(torch.int64))
        self.W = score_width(k_idx, cu_seqlens_k, seqlens_k if self.paged else None, max_seqlen_k)
        self.causal = bool(causal)
        # One contiguous sequence (the decode/prefill common case): every query shares the keys, so
        # a tile is one plain GEMM against a slice of k_idx; no per-token metadata at all.
        self.uniform = cu_seqlens_q is None and cu_seqlens_k is None and not self.paged
        if self.uniform:
            self.L = k_idx.shape[0]
        else:
            seq, L, q_pos, base = token_metadata(T, None if self.paged else k_idx.shape[0], self.device,
                                                 cu_seqlens_q, cu_seqlens_k, seqlens_k if self.paged else None)
            self.seq, self.Lt, self.q_pos, self.base = seq, L, q_pos, base
            self.table = block_table.to(torch.int64) if self.paged else None

    def tile(self, t0: int, t1: int, p0: int, p1: int) -> Tensor:
        """Scores [t1-t0, p1-p0] (compute dtype) of tokens [t0, t1) at positions [p0, p1), -inf if invalid."""
        c, n = t1 - t0, p1 - p0
        pos = torch.arange(p0, p1, device=self.device, dtype=torch.int64)
        q = self.q[t0:t1]  # [c, Hi, Di]
        if self.uniform:
            hi = min(p1, self.L)
            keys = self._keys(slice(p0, hi)) if hi > p0 else torch.zeros(0, self.Di, device=self.device, dtype=self.cd)
            logits = torch.matmul(q.reshape(c * self.Hi, self.Di), keys.t())  # [c*Hi, n']
            if hi < p1:  # positions past the sequence: pad (masked below)
                logits = torch.nn.functional.pad(logits, (0, p1 - hi))
            logits = logits.view(c, self.Hi, n)
            valid = (pos < self.L)[None, :]
            if self.causal:
                q_pos = torch.arange(t0, t1, device=self.device, dtype=torch.int64) + (self.L - self.T)
                valid = valid & (pos[None, :] <= q_pos[:, None])
            valid = self._in_window(valid, t0, t1, pos)
        else:
            L = self.Lt[t0:t1, None]
            valid = pos[None, :] < L
            if self.causal:
                valid = valid & (pos[None, :] <= self.q_pos[t0:t1, None])
            valid = self._in_window(valid, t0, t1, pos)
            if self.paged:
                rows, ok = paged_rows(self.table[self.seq[t0:t1]], pos[None, :].expand(c, n), self.page, self.P)
                # A page id outside the cache is never dereferenced (its position is dropped).
                valid = valid & ok
            else:
                rows = self.base[t0:t1, None] + pos[None, :]
            rows = torch.where(valid, rows, 0)
            keys = self._keys(rows)  # [c, n, Di]; invalid rows read row 0, masked below
            logits = torch.matmul(q, keys.transpose(1, 2))  # [c, Hi, n]
        logits.relu_()
        s = torch.matmul(self.w[t0:t1, None, :], logits).view(c, n)  # sum_j w_j relu(.), no [c,Hi,n] temp
        # where, not multiply: a garbage row (NaN in an unused page) must not leak into the score.
        return torch.where(valid, s, float("-inf"))

    def _keys(self, rows) -> Tensor:
        """Key rows (a slice or an index tensor) in the compute dtype, dequantized when k_idx is."""
        keys = self.k_flat[rows].to(self.cd)
        if self.k_scale is not None:
            keys = keys * self.k_scale[rows].to(self.cd)[..., None]
        return keys

    def _in_window(self, valid: Tensor, t0: int, t1: int, pos: Tensor) -> Tensor:
        if self.window is None:
            return valid
        ks, ke = self.window
        return valid & (pos[None, :] >= ks[t0:t1, None]) & (pos[None, :] < ke[t0:t1, None])

    def limit(self, t0: int, t1: int) -> int:
        """Positions [limit, W) are invalid for every token of [t0, t1) - known without a sync only for
        one contiguous sequence: past L, or (causal) past the last token's position."""
        if not self.uniform:
            return self.W
        end = min(self.W, self.L)
        if self.causal:
            end = min(end, max(0, (t1 - 1) + self.L - self.T + 1))
        return end

    def token_chunk(self, positions: int, chunk_bytes: int) -> int:
        per_token = positions * (self.Hi * 4 + 16) + (0 if self.uniform else positions * self.Di * 8)
        return max(1, int(chunk_bytes // max(1, per_token)))


def reduce_blocks(s: Tensor, block_size: int, block_reduce: str) -> Tensor:
    """[c, n*b] position scores -> [c, n] block scores over each block's valid positions
    (``block_reduce`` "max" or "mean"; a block without a valid position scores -inf)."""
    c = s.shape[0]
    s = s.view(c, s.shape[1] // block_size, block_size)  # not -1: c may be 0 (an empty batch)
    if block_reduce == "max":
        return s.amax(dim=2)  # -inf when the whole block is invalid
    valid = s > float("-inf")
    cnt = valid.sum(dim=2)
    tot = torch.where(valid, s, 0.0).sum(dim=2)
    return torch.where(cnt > 0, tot / cnt.clamp_min(1).to(s.dtype), float("-inf"))


def _split_by_sequence(q_idx: Tensor, per_sequence: Optional[bool], cu_seqlens_q, cu_seqlens_k, block_table) -> bool:
    """Run varlen/paged CPU calls one sequence at a time on the one-sequence fast path?

    On the CPU the lengths can be read for free, and then each sequence is a plain GEMM against its
    own keys (paged keys are gathered once per sequence: O(L) memory). The per-token gather path stays
    for devices, where reading the lengths would be a sync.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None or block_table is not None
    if per_sequence is not None:
        return bool(per_sequence) and varlen
    return (varlen and q_idx.device.type == "cpu" and type(q_idx) is Tensor
            and not torch.compiler.is_compiling())


def _sequences(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k, k_idx_scale=None):
    """(t0, t1, keys of the sequence [L_b, Di], their scales [L_b] or None) per sequence with at least
    one query token."""
    T = q_idx.shape[0]
    cq = [0, T] if cu_seqlens_q is None else cu_seqlens_q.tolist()
    paged = k_idx.dim() == 3
    ks_flat = None if k_idx_scale is None else k_idx_scale.reshape(-1)
    if paged:
        lens = seqlens_k.tolist()
        page = k_idx.shape[1]
        k_flat = k_idx.reshape(-1, k_idx.shape[-1])
    else:
        ck = [0, k_idx.shape[0]] if cu_seqlens_k is None else cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        if paged:
            pos = torch.arange(lens[b], device=k_idx.device)
            rows = block_table[b].to(torch.int64)[pos // page] * page + pos % page
        else:
            rows = slice(ck[b], ck[b + 1])
        yield cq[b], cq[b + 1], k_flat[rows] if paged else k_idx[rows], None if ks_flat is None else ks_flat[rows]


def _token_slice(t0: int, t1: int, **per_token) -> dict:
    """The per-token keyword tensors (scales of q_idx, key windows) of tokens [t0, t1); None stays None."""
    return {n: None if x is None else x[t0:t1] for n, x in per_token.items()}


# ----------------------------------------------------------------------------- production functions
def lightning_indexer(
    q_idx: Tensor, k_idx: Tensor, weights: Tensor, *, scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
    max_seqlen_k: Optional[int] = None, causal: bool = True, q_idx_scale: Optional[Tensor] = None,
    k_idx_scale: Optional[Tensor] = None, cu_seqlen_ks: Optional[Tensor] = None,
    cu_seqlen_ke: Optional[Tensor] = None, chunk_bytes: int = SELECT_CHUNK_BYTES,
    per_sequence: Optional[bool] = None,
) -> Tensor:
    """Index scores [T, W] float32 (float64 for float64 inputs), -inf where invalid.

    A quantized (float8_e4m3fn / int8) ``q_idx`` / ``k_idx`` is dequantized as
    ``stored * q_idx_scale[t, j]`` / ``stored * k_idx_scale[row]`` (scales as attention.selection
    normalises them: [T, Hi] and k_idx.shape[:-1]). ``cu_seqlen_ks`` / ``cu_seqlen_ke`` [T]: token t
    only sees positions in [ks[t], ke[t]) (besides the length and causal rules).
    """
    if _split_by_sequence(q_idx, per_sequence, cu_seqlens_q, cu_seqlens_k, block_table):
        W = score_width(k_idx, cu_seqlens_k, seqlens_k, max_seqlen_k)
        cd = torch.float64 if q_idx.dtype == torch.float64 else torch.float32
        out = torch.full((q_idx.shape[0], W), float("-inf"), device=q_idx.device, dtype=cd)
        for t0, t1, keys, kscale in _sequences(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k,
                                               k_idx_scale):
            n = min(W, keys.shape[0])
            out[t0:t1, :n] = lightning_indexer(
                q_idx[t0:t1], keys, weights[t0:t1], scale=scale, causal=causal, chunk_bytes=chunk_bytes,
                max_seqlen_k=n, k_idx_scale=kscale,
                **_token_slice(t0, t1, q_idx_scale=q_idx_scale, cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke))
        return out
    ix = _Indexer(q_idx, k_idx, weights, scale, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k,
                  max_seqlen_k, causal, q_idx_scale, k_idx_scale, cu_seqlen_ks, cu_seqlen_ke)
    out = torch.empty(ix.T, ix.W, device=ix.device, dtype=ix.cd)
    if ix.T == 0 or ix.W == 0:
        return out
    pc = min(ix.W, 8192)
    tc = ix.token_chunk(pc, chunk_bytes)
    for t0 in range(0, ix.T, tc):
        t1 = min(ix.T, t0 + tc)
        end = ix.limit(t0, t1)
        out[t0:t1, end:] = float("-inf")
        for p0 in range(0, end, pc):
            p1 = min(end, p0 + pc)
            out[t0:t1, p0:p1] = ix.tile(t0, t1, p0, p1)
    return out


def block_scores(scores: Tensor, block_size: int, block_reduce: str = "max") -> Tensor:
    """[T, W] position scores -> [T, ceil(W / block_size)] block scores (NSA-style block selection).

    Block j covers positions [j*b, j*b + b). "max": the best valid position of the block; "mean": the
    mean over the block's *valid* positions (a partial last block or a causally cut block is not
    diluted by its invalid positions). A block with no valid position is -inf.
    """
    T, W = scores.shape
    nb = -(-W // block_size)
    pad = nb * block_size - W
    s = torch.nn.functional.pad(scores, (0, pad), value=float("-inf")) if pad else scores
    return reduce_blocks(s.contiguous(), block_size, block_reduce)


@torch.no_grad()  # indices are not differentiable; no autograd graph may hold the chunks alive
def topk_indices(scores: Tensor, k: int, lengths: Optional[Tensor] = None) -> Tensor:
    """[T, W] scores -> [T, 1, k] int32: valid (> -inf, not NaN) positions by descending score,
    ties to the lower position, then -1.

    ``lengths`` [T] (vLLM's per-row lengths): row t ranks only positions [0, lengths[t]); the rest is
    invalid whatever it holds (values past W or below 0 are clamped, as the kernels do).

    Scores are ranked in their own dtype. float64 ones do not fit the 32-bit half of a packed key
    (rounding them to float32 would tie 1.0 with 1.0 + 1e-12 and turn -1e39 into -inf), so they take
    a stable descending sort instead: equal scores keep position order, the same tie rule.
    """
    T, W = scores.shape
    if lengths is not None:
        # -inf is what "invalid" means everywhere else; one masked copy keeps a single ranking path.
        inside = torch.arange(W, device=scores.device)[None, :] < lengths.to(torch.int64)[:, None]
        scores = torch.where(inside, scores, float("-inf"))
    if scores.dtype == torch.float64:
        s = torch.where(torch.isnan(scores), float("-inf"), scores)
        kk = min(k, W)
        top = torch.sort(s, dim=1, descending=True, stable=True)
        pos = torch.where(top.values[:, :kk] > float("-inf"), top.indices[:, :kk], -1).to(torch.int32)
        if kk < k:
            pos = torch.cat([pos, pos.new_full((T, k - kk), -1)], dim=1)
        return pos.view(T, 1, k)
    pos = torch.arange(W, device=scores.device, dtype=torch.int64)
    return best_positions(pack_keys(scores, pos[None, :]), k)


@torch.no_grad()  # indices are not differentiable; a graph would keep every chunk's logits alive
def select(
    q_idx: Tensor, k_idx: Tensor, weights: Tensor, k: int, *, scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
    max_seqlen_k: Optional[int] = None, causal: bool = True, block_size: int = 1,
    block_reduce: str = "max", q_idx_scale: Optional[Tensor] = None, k_idx_scale: Optional[Tensor] = None,
    cu_seqlen_ks: Optional[Tensor] = None, cu_seqlen_ke: Optional[Tensor] = None,
    chunk_bytes: int = SELECT_CHUNK_BYTES, key_chunk: int = 4096, per_sequence: Optional[bool] = None,
) -> Tensor:
    """Fused indexer + top-k: [T, 1, k] int32 position (block_size=1) or block indices.

    Streams over chunks of positions; each chunk's scores are packed (pack_keys) and merged with the
    running best k by one ``topk`` over [c, k + chunk]. Positions are visited in increasing order,
    but the packing makes the merge order irrelevant anyway. Memory: O(c * (k + chunk)) per chunk of
    c query tokens, never O(T * W).
    """
    if _split_by_sequence(q_idx, per_sequence, cu_seqlens_q, cu_seqlens_k, block_table):
        out = torch.full((q_idx.shape[0], 1, k), -1, device=q_idx.device, dtype=torch.int32)
        W = score_width(k_idx, cu_seqlens_k, seqlens_k, max_seqlen_k)
        for t0, t1, keys, kscale in _sequences(q_idx, k_idx, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k,
                                               k_idx_scale):
            n = min(W, keys.shape[0])
            out[t0:t1] = select(
                q_idx[t0:t1], keys, weights[t0:t1], k, scale=scale, causal=causal, block_size=block_size,
                block_reduce=block_reduce, chunk_bytes=chunk_bytes, key_chunk=key_chunk, max_seqlen_k=n,
                k_idx_scale=kscale,
                **_token_slice(t0, t1, q_idx_scale=q_idx_scale, cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke))
        return out
    ix = _Indexer(q_idx, k_idx, weights, scale, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k,
                  max_seqlen_k, causal, q_idx_scale, k_idx_scale, cu_seqlen_ks, cu_seqlen_ke)
    T, b = ix.T, int(block_size)
    nb = -(-ix.W // b)  # blocks (= positions when b == 1)
    if T == 0 or k == 0 or nb == 0:
        return torch.full((T, 1, k), -1, device=ix.device, dtype=torch.int32)
    # Position chunk: a multiple of the block size, about ``key_chunk`` positions, at most the width.
    blocks_per_chunk = min(nb, max(1, key_chunk // b))
    pc = blocks_per_chunk * b
    tc = ix.token_chunk(pc + 2 * k, chunk_bytes)
    outs = []
    for t0 in range(0, T, tc):
        t1 = min(T, t0 + tc)
        best = torch.empty(t1 - t0, 0, device=ix.device, dtype=torch.int64)
        for j0 in range(0, -(-ix.limit(t0, t1) // b), blocks_per_chunk):
            j1 = min(nb, j0 + blocks_per_chunk)
            s = ix.tile(t0, t1, j0 * b, j1 * b)
            if b > 1:
                s = reduce_blocks(s, b, block_reduce)
            ids = torch.arange(j0, j1, device=ix.device, dtype=torch.int64)
            keys = torch.cat([best, pack_keys(s, ids[None, :])], dim=1)
            if keys.shape[1] > k:
                keys = torch.topk(keys, k, dim=1, largest=True, sorted=False).values
            best = keys
        outs.append(best_positions(best, k))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# ----------------------------------------------------------------------------- float64 oracles
def lightning_indexer_dense(
    q_idx: Tensor, k_idx: Tensor, weights: Tensor, *, scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
    max_seqlen_k: Optional[int] = None, causal: bool = True, q_idx_scale: Optional[Tensor] = None,
    k_idx_scale: Optional[Tensor] = None, cu_seqlen_ks: Optional[Tensor] = None,
    cu_seqlen_ke: Optional[Tensor] = None, dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The oracle: docs/spec.md section 2 in ``dtype`` on the CPU, one query at a time, on the dequantized
    q_idx / k_idx (scales [T, Hi] / k_idx.shape[:-1], a trailing 1 allowed), inside the key windows."""
    cpu = torch.device("cpu")
    q = q_idx.detach().to(cpu, dtype)
    kx = k_idx.detach().to(cpu, dtype)
    if q_idx_scale is not None:
        q = q * q_idx_scale.detach().to(cpu, dtype).reshape(q.shape[:-1])[..., None]
    if k_idx_scale is not None:
        kx = kx * k_idx_scale.detach().to(cpu, dtype).reshape(kx.shape[:-1])[..., None]
    w = weights.detach().to(cpu, dtype)
    T, Hi, Di = q.shape
    sc = Di ** -0.5 if scale is None else float(scale)
    paged = kx.dim() == 3
    cq = [0, T] if cu_seqlens_q is None else cu_seqlens_q.tolist()
    B = len(cq) - 1
    if paged:
        lens = seqlens_k.tolist()
        table = block_table.detach().cpu().to(torch.int64)
        page = kx.shape[1]
    else:
        ck = [0, kx.shape[0]] if cu_seqlens_k is None else cu_seqlens_k.tolist()
        lens = [ck[b + 1] - ck[b] for b in range(B)]
    W = int(max_seqlen_k) if max_seqlen_k is not None else (max(lens) if lens else 0)
    out = torch.full((T, W), float("-inf"), dtype=dtype)
    for b in range(B):
        Lb = lens[b]
        if paged:
            p = torch.arange(Lb)
            keys = kx[table[b, p // page], p % page]
        else:
            keys = kx[ck[b]:ck[b] + Lb]
        for t in range(cq[b], cq[b + 1]):
            q_pos = Lb - (cq[b + 1] - cq[b]) + (t - cq[b])
            n = min(Lb, q_pos + 1) if causal else Lb
            n = min(max(n, 0), W)
            lo = 0
            if cu_seqlen_ks is not None:  # the window [ks, ke) of token t
                lo = max(0, int(cu_seqlen_ks[t]))
                n = min(n, max(0, int(cu_seqlen_ke[t])))
            if n <= lo:
                continue
            # sum_j w[t, j] * relu(scale * q[t, j] . k[s])
            out[t, lo:n] = (w[t][:, None] * torch.relu(sc * (q[t] @ keys[lo:n].t()))).sum(0)
    return out


def block_scores_dense(scores: Tensor, block_size: int, block_reduce: str = "max") -> Tensor:
    """Oracle of :func:`block_scores`: a loop over blocks."""
    T, W = scores.shape
    nb = -(-W // block_size)
    out = torch.full((T, nb), float("-inf"), dtype=scores.dtype)
    for j in range(nb):
        blk = scores[:, j * block_size:(j + 1) * block_size]
        for t in range(T):
            v = blk[t][blk[t] > float("-inf")]
            if v.numel():
                out[t, j] = v.max() if block_reduce == "max" else v.mean()
    return out


def topk_indices_dense(scores: Tensor, k: int, lengths: Optional[Tensor] = None) -> Tensor:
    """Oracle of :func:`topk_indices`: a stable descending sort (equal scores keep position order);
    with ``lengths``, row t ranks its first lengths[t] positions only."""
    s = scores.detach().cpu().to(torch.float64)
    s = torch.where(torch.isnan(s), float("-inf"), s)
    T, W = s.shape
    if lengths is not None:
        for t, n in enumerate(lengths.tolist()):
            s[t, max(0, n):] = float("-inf")
    order = torch.sort(s, dim=1, descending=True, stable=True)
    idx = torch.where(order.values > float("-inf"), order.indices, -1)[:, :k]
    if idx.shape[1] < k:
        idx = torch.cat([idx, idx.new_full((T, k - idx.shape[1]), -1)], dim=1)
    return idx.to(torch.int32).view(T, 1, k)


def select_dense(q_idx, k_idx, weights, k, *, block_size=1, block_reduce="max", **kw) -> Tensor:
    """Oracle of :func:`select`: dense float64 scores, optional block reduction, stable sort."""
    s = lightning_indexer_dense(q_idx, k_idx, weights, **kw)
    if block_size > 1:
        s = block_scores_dense(s, block_size, block_reduce)
    return topk_indices_dense(s, k)
