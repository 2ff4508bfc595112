"""Triton kernels of the selective-attention forward (SPEC.md section 1).

One program = one query token x one kv head x one block of the query heads that share that kv head
(x one block of value columns, x one split of the candidate list). Packing the heads of a kv group
into the M dimension of ``tl.dot`` is what makes MQA/MLA decode efficient: one gathered key tile
serves every head of the group (128 for DeepSeek) instead of being re-read per head.

Scores are kept in base 2 (scale folded with log2(e)) so the online softmax uses ``exp2``; the LSE
is converted back to the natural log once at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr):
    # F32_DOT: float32 operands (float32 inputs, or any dtype under the interpreter, whose bfloat16
    # dot is wrong, docs/traps.md). "ieee" keeps float32 inputs out of TF32 so 1e-4 tolerances hold.
    if F32_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _sequence_of_token(t, CUQ, B, SEARCH_STEPS: tl.constexpr):
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
def selective_attention_fwd_kernel(
    Q, KV, V, QR, KVR, IDX, SINK, BT, CUQ, CUK, SEQK,
    OUT, LSE, OPART, LPART,
    sm_scale_log2, T, B, S_total, num_pages, max_pages, n_cand, cand_per_split,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    stride_qrt, stride_qrh, stride_qrd,
    stride_krp, stride_krr, stride_krh, stride_krd,
    stride_it, stride_ig, stride_ik,
    stride_btb, stride_btp,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    stride_ops, stride_opt, stride_oph, stride_opd,
    stride_lps, stride_lpt, stride_lph,
    HG: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    VARLEN: tl.constexpr, HAS_CUK: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SINK: tl.constexpr, SPLIT: tl.constexpr, SEARCH_STEPS: tl.constexpr, F32_DOT: tl.constexpr,
    NUM_HB: tl.constexpr, NUM_DVB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0)
    pid1 = tl.program_id(1)
    pid_s = tl.program_id(2)
    g = pid1 // (NUM_HB * NUM_DVB)
    hb = (pid1 // NUM_DVB) % NUM_HB
    dvb = pid1 % NUM_DVB

    # ---- sequence facts of token t, on the device ----
    if VARLEN:
        b = _sequence_of_token(t, CUQ, B, SEARCH_STEPS)
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
    q_pos = L - lq + (t - q_start)
    n_units = (L + BLOCK_SIZE - 1) // BLOCK_SIZE  # blocks (or tokens) that hold any position < L

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < HG
    heads = g * HG + offs_h
    offs_dv = dvb * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV

    q_base = Q + t.to(tl.int64) * stride_qt + heads[:, None].to(tl.int64) * stride_qh
    qr_base = QR + t.to(tl.int64) * stride_qrt + heads[:, None].to(tl.int64) * stride_qrh
    idx_base = IDX + t.to(tl.int64) * stride_it + g * stride_ig

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)

    c_start = pid_s * cand_per_split
    c_end = tl.minimum(c_start + cand_per_split, n_cand)
    for c0 in range(c_start, c_end, BLOCK_N):
        offs_c = c0 + tl.arange(0, BLOCK_N)
        c_mask = offs_c < c_end
        if BLOCK_SIZE == 1:
            j = offs_c
            r = offs_c * 0
        else:
            j = offs_c // BLOCK_SIZE
            r = offs_c % BLOCK_SIZE
        idx = tl.load(idx_base + j * stride_ik, mask=c_mask, other=-1)
        # Range-check the index in its own dtype before multiplying (int64 indices could overflow).
        valid = c_mask & (idx >= 0) & (idx < n_units)
        pos = tl.where(valid, idx, 0).to(tl.int32) * BLOCK_SIZE + r
        valid = valid & (pos < L)
        if CAUSAL:
            valid = valid & (pos <= q_pos)
        if PAGED:
            page_i = pos // PAGE_SIZE
            valid = valid & (page_i < max_pages)
            page = tl.load(BT + b * stride_btb + page_i * stride_btp, mask=valid, other=0)
            valid = valid & (page >= 0) & (page < num_pages)
            page = tl.where(valid, page, 0).to(tl.int64)
            in_page = (pos % PAGE_SIZE).to(tl.int64)
            k_row = page * stride_kp + in_page * stride_kr
            v_row = page * stride_vp + in_page * stride_vr
            kr_row = page * stride_krp + in_page * stride_krr
        else:
            row = (base + tl.where(valid, pos, 0)).to(tl.int64)
            k_row = row * stride_kr
            v_row = row * stride_vr
            kr_row = row * stride_krr

        # ---- scores [BLOCK_H, BLOCK_N]: head widths walked in power-of-two chunks (576 = 9 x 64) ----
        # A runtime loop, not static_range: unrolled, the compiler hoists all of q (64 heads x 576,
        # loop-invariant) into registers and spills (measured: 255 regs + 816 B stack on sm_90 for
        # BLOCK_H=64, BLOCK_DV=256, 8 warps; 0 B with this loop). q chunks are re-read from L1/L2.
        s = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        k_base = KV + g * stride_kh + k_row[None, :]
        for d0 in range(0, DQK, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < DQK
            qc = tl.load(q_base + offs_d[None, :] * stride_qd, mask=h_mask[:, None] & d_mask[None, :], other=0.0)
            kc = tl.load(k_base + offs_d[:, None] * stride_kd, mask=valid[None, :] & d_mask[:, None], other=0.0)
            s += _dot(qc, kc, F32_DOT)
        if DR > 0:
            kr_base = KVR + g * stride_krh + kr_row[None, :]
            for d0 in range(0, DR, BLOCK_DR):
                offs_d = d0 + tl.arange(0, BLOCK_DR)
                d_mask = offs_d < DR
                qc = tl.load(qr_base + offs_d[None, :] * stride_qrd, mask=h_mask[:, None] & d_mask[None, :],
                             other=0.0)
                kc = tl.load(kr_base + offs_d[:, None] * stride_krd, mask=valid[None, :] & d_mask[:, None],
                             other=0.0)
                s += _dot(qc, kc, F32_DOT)
        s = tl.where(valid[None, :], s * sm_scale_log2, float("-inf"))

        # ---- online softmax; an all-dropped tile leaves m at -inf, so subtract 0 there, never NaN ----
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # Masked load: a dropped row is never read, so NaN in an unused page cannot reach acc.
        vt = tl.load(V + g * stride_vh + v_row[:, None] + offs_dv[None, :] * stride_vd,
                     mask=valid[:, None] & dv_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, F32_DOT)
        m_i = m_new

    nonempty = l_i > 0
    if SPLIT:
        # Partial result of this split: normalised output and its base-2 LSE; the combine kernel
        # weights the splits by exp2(lse2) and applies the sink once.
        o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        op = (OPART + pid_s.to(tl.int64) * stride_ops + t.to(tl.int64) * stride_opt
              + heads[:, None].to(tl.int64) * stride_oph + offs_dv[None, :] * stride_opd)
        tl.store(op, o, mask=h_mask[:, None] & dv_mask[None, :])
        lp = LPART + pid_s.to(tl.int64) * stride_lps + t.to(tl.int64) * stride_lpt + heads * stride_lph
        tl.store(lp, lse2, mask=h_mask & ((offs_h * 0 + dvb) == 0))
    else:
        m_fin = tl.where(nonempty, m_i, 0.0)
        denom = l_i
        if HAS_SINK:
            sink2 = tl.load(SINK + heads, mask=h_mask, other=0.0) * 1.4426950408889634
            denom = denom + tl.exp2(sink2 - m_fin)
        # A kept row has l >= 1 (its max term is exp2(0)); an empty one has acc = 0: 0 / 1 = 0.
        denom = tl.where(nonempty, denom, 1.0)
        o = acc / denom[:, None]
        op = OUT + t.to(tl.int64) * stride_ot + heads[:, None].to(tl.int64) * stride_oh + offs_dv[None, :] * stride_od
        tl.store(op, o.to(OUT.dtype.element_ty), mask=h_mask[:, None] & dv_mask[None, :])
        lse = tl.where(nonempty, (m_fin + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(LSE + t.to(tl.int64) * stride_lt + heads * stride_lh, lse, mask=h_mask & ((offs_h * 0 + dvb) == 0))


@triton.jit
def selective_attention_combine_kernel(
    OPART, LPART, SINK, OUT, LSE, H, num_splits,
    stride_ops, stride_opt, stride_oph, stride_opd,
    stride_lps, stride_lpt, stride_lph,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    DV: tl.constexpr, HAS_SINK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Flash-decoding combine: out = sum_i 2^lse2_i o_i / (sum_i 2^lse2_i + 2^sink2), in a fixed
    split order (deterministic)."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for i in range(0, num_splits):
        l2 = tl.load(LPART + i * stride_lps + t * stride_lpt + offs_h * stride_lph, mask=h_mask, other=float("-inf"))
        m = tl.maximum(m, l2)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    wsum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for i in range(0, num_splits):
        l2 = tl.load(LPART + i * stride_lps + t * stride_lpt + offs_h * stride_lph, mask=h_mask, other=float("-inf"))
        w = tl.exp2(l2 - m_sub)
        o = tl.load(OPART + i * stride_ops + t * stride_opt + offs_h[:, None] * stride_oph + offs_dv[None, :] * stride_opd,
                    mask=h_mask[:, None] & dv_mask[None, :] & (l2 > float("-inf"))[:, None], other=0.0)
        wsum += w
        acc += w[:, None] * o
    nonempty = wsum > 0
    denom = wsum
    if HAS_SINK:
        sink2 = tl.load(SINK + offs_h, mask=h_mask, other=0.0) * 1.4426950408889634
        denom = denom + tl.exp2(sink2 - m_sub)
    denom = tl.where(nonempty, denom, 1.0)
    out = acc / denom[:, None]
    tl.store(OUT + t * stride_ot + offs_h[:, None] * stride_oh + offs_dv[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=h_mask[:, None] & dv_mask[None, :])
    lse = tl.where(nonempty, (m_sub + tl.log2(tl.where(nonempty, wsum, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + t * stride_lt + offs_h * stride_lh, lse, mask=h_mask & ((offs_h * 0 + tl.program_id(2)) == 0))
