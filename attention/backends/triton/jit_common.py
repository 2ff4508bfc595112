"""@triton.jit helpers and constants shared by the Triton kernels (forward, backward, merge): the
token's sequence facts, which candidates are kept and where their rows are, the dot with the
interpreter's float32 rule, and log2(e) / ln(2) for the base-2 softmax. Each is written once here;
the kernels' own modules hold only what one of them uses."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# The same constants inside @triton.jit code (a plain global float is not allowed there).
JIT_LOG2E = tl.constexpr(LOG2E)
JIT_LN2 = tl.constexpr(LN2)


@triton.jit
def dot(a, b, F32_DOT: tl.constexpr):
    # F32_DOT: float32 operands (float32 inputs, or any dtype under the interpreter, whose bfloat16
    # dot is wrong, docs/traps.md). "ieee" keeps float32 inputs out of TF32 so 1e-4 tolerances hold.
    if F32_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def sequence_of_token(t, CUQ, B, SEARCH_STEPS: tl.constexpr):
    """Sequence b with cu_seqlens_q[b] <= t < cu_seqlens_q[b+1], by a fixed-step binary search on
    the device (no host sync). Empty sequences are skipped naturally: the first b whose end > t."""
    lo = t * 0
    hi = lo + B
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        end = tl.load(CUQ + mid + 1, mask=active, other=0)
        go_right = active & (end <= t)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(active & (end > t), mid, hi)
    return tl.minimum(lo, B - 1)


@triton.jit
def sequence_facts(t, CUQ, CUK, SEQK, T, B, S_total, VARLEN: tl.constexpr, HAS_CUK: tl.constexpr,
                    PAGED: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(sequence b, first kv row, length L, query position, units holding a position < L) of token t."""
    if VARLEN:
        b = sequence_of_token(t, CUQ, B, SEARCH_STEPS)
        q_start = tl.load(CUQ + b)
        lq = tl.load(CUQ + b + 1) - q_start
    else:
        b = t * 0
        q_start = t * 0
        lq = t * 0 + T
    if PAGED:
        L = tl.load(SEQK + b)
        base = t * 0
    elif HAS_CUK:
        base = tl.load(CUK + b)
        L = tl.load(CUK + b + 1) - base
    else:
        base = t * 0
        L = t * 0 + S_total
    # Positions, lengths and row numbers in int64: L + BLOCK_SIZE - 1, idx * BLOCK_SIZE and base + pos
    # overflow int32 for caches near 2**31 rows; pointer offsets are int64 too.
    L = L.to(tl.int64)
    q_pos = L - lq + (t - q_start)
    n_units = (L + BLOCK_SIZE - 1) // BLOCK_SIZE  # blocks (or tokens) that hold any position < L
    return b, base.to(tl.int64), L, q_pos, n_units


@triton.jit
def candidate_positions(offs_c, c_end, idx_base, stride_ik, L, q_pos, n_units, BLOCK_SIZE: tl.constexpr,
                         CAUSAL: tl.constexpr):
    """(kept mask, position) of candidates ``offs_c``, from the indices, the length and causality
    alone (a paged cache's table may still drop a kept one): candidate c is position
    indices[c // b] * b + c % b (docs/spec.md section 1). A dropped candidate's position is below b."""
    c_mask = offs_c < c_end
    if BLOCK_SIZE == 1:
        j = offs_c
        r = offs_c * 0
    else:
        j = offs_c // BLOCK_SIZE
        r = offs_c % BLOCK_SIZE
    idx = tl.load(idx_base + j.to(tl.int64) * stride_ik, mask=c_mask, other=-1)
    # Range-check the index in its own dtype before multiplying (int64 indices could overflow).
    valid = c_mask & (idx >= 0) & (idx < n_units)
    pos = tl.where(valid, idx, 0).to(tl.int64) * BLOCK_SIZE + r
    valid = valid & (pos < L)
    if CAUSAL:
        valid = valid & (pos <= q_pos)
    return valid, pos


@triton.jit
def candidate_rows(c0, c_end, idx_base, stride_ik, b, base, L, q_pos, n_units, BT, stride_btb, stride_btp,
                    max_pages, num_pages, BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    CAUSAL: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Candidates c0 .. c0 + BLOCK_N: (kept mask, page, row) with the row of a kept candidate at
    ``page * stride_page + row * stride_row`` (contiguous caches: page 0, stride_page 0).

    A dropped candidate's page and row are 0, so no load of it can leave the cache."""
    valid, pos = candidate_positions(c0 + tl.arange(0, BLOCK_N), c_end, idx_base, stride_ik, L, q_pos, n_units,
                                      BLOCK_SIZE, CAUSAL)
    if PAGED:
        page_i = pos // PAGE_SIZE
        valid = valid & (page_i < max_pages)
        page = tl.load(BT + b.to(tl.int64) * stride_btb + page_i * stride_btp, mask=valid, other=0)
        valid = valid & (page >= 0) & (page < num_pages)
        page = tl.where(valid, page, 0).to(tl.int64)
        row = tl.where(valid, pos % PAGE_SIZE, 0)
    else:
        page = pos * 0
        row = base + tl.where(valid, pos, 0)
    return valid, page, row


@triton.jit
def load_rows(row_ptrs, offs, mask_r, mask_c, stride_d):
    """[len(row_ptrs), len(offs)] tile of the rows starting at ``row_ptrs``, masked: never reads a dropped row."""
    return tl.load(row_ptrs[:, None] + offs[None, :].to(tl.int64) * stride_d, mask=mask_r[:, None] & mask_c[None, :],
                   other=0.0)


@triton.jit
def load_q_parts(Q, QR, t, heads, h_mask, offs_k, k_mask, stride_qt, stride_qh, stride_qd, stride_qrt, stride_qrh,
                 stride_qrd, DQK: tl.constexpr, DK: tl.constexpr, DR: tl.constexpr, BLOCK_DT: tl.constexpr,
                 BLOCK_DR: tl.constexpr):
    """q of token t's ``heads``, loaded once per program as the kernels' key tiles split it:
    (q_k [heads, offs_k] (columns < DK), q_tail [heads, DK .. DQK) (a latent row's columns past the
    value: DeepSeek's 64 inside the 576), q_rope [heads, DR] (the split rope part)). An absent part
    (DQK == DK, DR == 0) is returned as q_k and never read."""
    q_base = Q + t.to(tl.int64) * stride_qt + heads.to(tl.int64) * stride_qh
    q_k = load_rows(q_base, offs_k, h_mask, k_mask, stride_qd)
    q_tail = q_k
    q_rope = q_k
    if DQK > DK:
        offs_dt = DK + tl.arange(0, BLOCK_DT)
        q_tail = load_rows(q_base, offs_dt, h_mask, offs_dt < DQK, stride_qd)
    if DR > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        q_rope = load_rows(QR + t.to(tl.int64) * stride_qrt + heads.to(tl.int64) * stride_qrh, offs_dr, h_mask,
                           offs_dr < DR, stride_qrd)
    return q_k, q_tail, q_rope
