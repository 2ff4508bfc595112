"""Triton kernels of the selective-attention backward (docs/triton.md "Backward").

With P = exp(s - lse) over the kept candidates (recomputed from the forward's saved LSE, never by
re-running the forward's online softmax), P' = P * sigmoid(lse - sink) the weights that produced out,
and delta = rowsum(dO * out):

    dS = P' * (dO @ V^T - delta) + dlse * P;   dq = scale * dS @ K;   dK = scale * dS^T @ q;   dV = P'^T @ dO

``selective_attention_bwd_kernel`` runs one program per query token x kv head x block of that kv
group's query heads, like the forward. It owns its rows of dq/dq_rope (plain stores) and scatters the
key/value gradients of its candidates into the cache rows they name with float32 atomics (a row
selected twice gets both contributions). In deterministic mode it writes each candidate's flat
cache row instead, and ``selective_attention_bwd_dkv_kernel`` (one program per cache row x kv head)
reduces the candidates that name its row in a fixed order: no atomics, identical bits on repeat.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit_common import JIT_LOG2E, candidate_rows, dot, load_q_parts, load_rows, sequence_facts


@triton.jit
def _bwd_row_stats(LSE, DELTA, DO, DLSE, SINK, t64, heads, h_mask, offs_dv, dv_mask, stride_lt, stride_lh, stride_dt,
                   stride_dh, stride_dot, stride_doh, stride_dod, stride_dlt, stride_dlh, HAS_SINK: tl.constexpr,
                   HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token t's per-head state of the backward, loaded once: (lse2 = lse * log2 e, dO [heads, DV],
    delta, p_share = P' / P = 1 / (1 + exp(sink - lse)), dlse). Parts the call lacks (no dO, no dlse)
    are returned as lse2 and never read.

    lse of an empty row is -inf: its candidates are all dropped, so P is masked to 0 there; 0 is
    subtracted instead so that no -inf - (-inf) is ever formed."""
    lse = tl.load(LSE + t64 * stride_lt + heads * stride_lh, mask=h_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    lse2 = lse * JIT_LOG2E
    do = lse2
    delta = lse2
    p_share = lse2
    dlse = lse2
    if HAS_DO:
        do = load_rows(DO + t64 * stride_dot + heads.to(tl.int64) * stride_doh, offs_dv, h_mask, dv_mask, stride_dod)
        delta = tl.load(DELTA + t64 * stride_dt + heads * stride_dh, mask=h_mask, other=0.0)
        if HAS_SINK:
            # P' = P * exp(lse) / (exp(lse) + exp(sink)) = P / (1 + exp(sink - lse))
            sink = tl.load(SINK + heads, mask=h_mask, other=0.0)
            p_share = 1.0 / (1.0 + tl.exp2((sink - lse) * JIT_LOG2E))
        else:
            p_share = tl.full([BLOCK_H], 1.0, tl.float32)
    if HAS_DLSE:
        dlse = tl.load(DLSE + t64 * stride_dlt + heads * stride_dlh, mask=h_mask, other=0.0)
    return lse2, do, delta, p_share, dlse


@triton.jit
def _bwd_key_tiles(k_row, kr_row, valid, q_k, q_tail, q_rope, offs_dk, dk_mask, stride_kd, stride_krd,
                   DQK: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, HAS_TAIL: tl.constexpr,
                   BLOCK_DT: tl.constexpr, BLOCK_DR: tl.constexpr, F32_DOT: tl.constexpr):
    """The gathered key tiles of one candidate tile and their scores: (s [BLOCK_H, BLOCK_N] unscaled,
    k_k, k_tail, k_rope); absent parts are returned as k_k, never read. Masked gathers: a dropped row
    is never read, so NaN in an unused page cannot reach a gradient."""
    k_k = load_rows(k_row, offs_dk, valid, dk_mask, stride_kd)
    s = dot(q_k, tl.trans(k_k), F32_DOT)
    k_tail = k_k
    k_rope = k_k
    if HAS_TAIL:
        offs_dt = DV + tl.arange(0, BLOCK_DT)
        k_tail = load_rows(k_row, offs_dt, valid, offs_dt < DQK, stride_kd)
        s += dot(q_tail, tl.trans(k_tail), F32_DOT)
    if DR > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        k_rope = load_rows(kr_row, offs_dr, valid, offs_dr < DR, stride_krd)
        s += dot(q_rope, tl.trans(k_rope), F32_DOT)
    return s, k_k, k_tail, k_rope


@triton.jit
def _bwd_dscores(p, keep, vt, do, delta, p_share, dlse, sm_scale, HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr):
    """(dS * scale, P') [BLOCK_H, BLOCK_N] of one tile from its P and values:
    dS = P' * (dO V^T - delta) + dlse * P, P' = P * p_share. A dropped candidate's dS is exactly 0
    (where, not a product: its score may be NaN). Without dO the second is returned as dS, never read.
    The caller forms dV = P'^T dO only where it adds it: a [BLOCK_N, DV] float32 tile made here would
    stay live across the dq products (triton 3.6 spilled 8 B at the DeepSeek prefill)."""
    ds = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    pp = ds
    if HAS_DO:
        pp = p * p_share[:, None]
        dp = dot(do, tl.trans(vt), F32_DOT)
        ds = pp * (dp - delta[:, None])
    if HAS_DLSE:
        ds += dlse[:, None] * p
    return tl.where(keep, ds * sm_scale, 0.0), pp


@triton.jit
def _bwd_scatter(GK, GV, GKR, g64, page, row, valid, dk_k, dk_tail, dvals, dk_rope, offs_dk, dk_mask, offs_dv,
                 dv_mask, stride_gkp, stride_gkr, stride_gkh, stride_gkd, stride_gvp, stride_gvr, stride_gvh,
                 stride_gvd, stride_gkrp, stride_gkrr, stride_gkrh, stride_gkrd, DQK: tl.constexpr, DV: tl.constexpr,
                 DR: tl.constexpr, LATENT: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_DO: tl.constexpr,
                 BLOCK_DT: tl.constexpr, BLOCK_DR: tl.constexpr):
    """Adds one tile's key/value gradients into the float32 cache-gradient rows its kept candidates
    name (relaxed atomics: a row named twice gets both contributions)."""
    gk_row = GK + g64 * stride_gkh + page * stride_gkp + row * stride_gkr
    m_row = valid[:, None]
    tl.atomic_add(gk_row[:, None] + offs_dk[None, :].to(tl.int64) * stride_gkd, dk_k,
                  mask=m_row & dk_mask[None, :], sem="relaxed")
    if HAS_TAIL:
        offs_dt = DV + tl.arange(0, BLOCK_DT)
        tl.atomic_add(gk_row[:, None] + offs_dt[None, :].to(tl.int64) * stride_gkd, dk_tail,
                      mask=m_row & (offs_dt < DQK)[None, :], sem="relaxed")
    if HAS_DO and not LATENT:
        gv_row = GV + g64 * stride_gvh + page * stride_gvp + row * stride_gvr
        tl.atomic_add(gv_row[:, None] + offs_dv[None, :].to(tl.int64) * stride_gvd, dvals,
                      mask=m_row & dv_mask[None, :], sem="relaxed")
    if DR > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        gkr_row = GKR + g64 * stride_gkrh + page * stride_gkrp + row * stride_gkrr
        tl.atomic_add(gkr_row[:, None] + offs_dr[None, :].to(tl.int64) * stride_gkrd, dk_rope,
                      mask=m_row & (offs_dr < DR)[None, :], sem="relaxed")


@triton.jit
def _bwd_store_dq(DQ, DQR, t64, heads, h_mask, dq_k, dq_tail, dq_rope, offs_dk, dk_mask, stride_dqt, stride_dqh,
                  stride_dqd, stride_dqrt, stride_dqrh, stride_dqrd, DQK: tl.constexpr, DV: tl.constexpr,
                  DR: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DR: tl.constexpr):
    """dq and dq_rope of the program's heads: plain stores (the program owns these rows)."""
    hrow = heads.to(tl.int64)
    dq_base = DQ + t64 * stride_dqt + hrow[:, None] * stride_dqh
    tl.store(dq_base + offs_dk[None, :].to(tl.int64) * stride_dqd, dq_k.to(DQ.dtype.element_ty),
             mask=h_mask[:, None] & dk_mask[None, :])
    if HAS_TAIL:
        offs_dt = DV + tl.arange(0, BLOCK_DT)
        tl.store(dq_base + offs_dt[None, :].to(tl.int64) * stride_dqd, dq_tail.to(DQ.dtype.element_ty),
                 mask=h_mask[:, None] & (offs_dt < DQK)[None, :])
    if DR > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        tl.store(DQR + t64 * stride_dqrt + hrow[:, None] * stride_dqrh + offs_dr[None, :].to(tl.int64) * stride_dqrd,
                 dq_rope.to(DQR.dtype.element_ty), mask=h_mask[:, None] & (offs_dr < DR)[None, :])


@triton.jit
def selective_attention_bwd_kernel(
    Q, KV, V, QR, KVR, IDX, BT, CUQ, CUK, SEQK, SINK, LSE, DELTA, DO, DLSE,
    DQ, DQR, GK, GV, GKR, ROWS,
    sm_scale, T, B, S_total, num_pages, max_pages, n_cand,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    stride_qrt, stride_qrh, stride_qrd,
    stride_krp, stride_krr, stride_krh, stride_krd,
    stride_it, stride_ig, stride_ik,
    stride_btb, stride_btp,
    stride_lt, stride_lh, stride_dt, stride_dh,
    stride_dot, stride_doh, stride_dod, stride_dlt, stride_dlh,
    stride_dqt, stride_dqh, stride_dqd, stride_dqrt, stride_dqrh, stride_dqrd,
    stride_gkp, stride_gkr, stride_gkh, stride_gkd,
    stride_gvp, stride_gvr, stride_gvh, stride_gvd,
    stride_gkrp, stride_gkrr, stride_gkrh, stride_gkrd,
    stride_rt, stride_rg,
    HG: tl.constexpr, DQK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
    LATENT: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    VARLEN: tl.constexpr, HAS_CUK: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr, ATOMIC: tl.constexpr,
    WRITE_ROWS: tl.constexpr, SEARCH_STEPS: tl.constexpr, F32_DOT: tl.constexpr, NUM_HB: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq, dq_rope, and the key/value gradients of the candidates (atomics, or their rows in ROWS).

    Key columns: [0, DK) in one tile (DK = DV in latent mode, where that tile is also the value, so a
    cache row receives its key and value gradient in one add), then the tail [DV, DQK) of a latent
    row (DeepSeek's 64 rope columns inside the 576) in a second tile; separate-V mode has no tail.
    Whole-width tiles keep dq in registers across candidate tiles, so the scores are computed once
    per tile (no recompute per column chunk: the work stays at the useful 2.5x the forward's dots)."""
    t = tl.program_id(0)
    pid1 = tl.program_id(1)
    g = pid1 // NUM_HB
    hb = pid1 % NUM_HB

    b, base, L, q_pos, n_units = sequence_facts(t, CUQ, CUK, SEQK, T, B, S_total, VARLEN, HAS_CUK, PAGED,
                                                SEARCH_STEPS, BLOCK_SIZE)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < HG
    heads = g * HG + offs_h
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_mask = offs_dk < DK
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV

    t64 = t.to(tl.int64)
    g64 = g.to(tl.int64)
    q_k, q_tail, q_rope = load_q_parts(Q, QR, t, heads, h_mask, offs_dk, dk_mask, stride_qt, stride_qh, stride_qd,
                                       stride_qrt, stride_qrh, stride_qrd, DQK, DK, DR, BLOCK_DT, BLOCK_DR)
    lse2, do, delta, p_share, dlse = _bwd_row_stats(LSE, DELTA, DO, DLSE, SINK, t64, heads, h_mask, offs_dv, dv_mask,
                                                    stride_lt, stride_lh, stride_dt, stride_dh, stride_dot,
                                                    stride_doh, stride_dod, stride_dlt, stride_dlh, HAS_SINK, HAS_DO,
                                                    HAS_DLSE, BLOCK_H)
    sm_scale_log2 = sm_scale * JIT_LOG2E

    dq_k = tl.zeros([BLOCK_H, BLOCK_DK], tl.float32)
    dq_tail = tl.zeros([BLOCK_H, BLOCK_DT], tl.float32)
    dq_rope = tl.zeros([BLOCK_H, BLOCK_DR], tl.float32)
    idx_base = IDX + t64 * stride_it + g64 * stride_ig
    # The program that writes a token's candidate rows: one per (token, index group).
    writes_rows = (hb == 0) & ((stride_ig != 0) | (g == 0))

    for c0 in range(0, n_cand, BLOCK_N):
        valid, page, row = candidate_rows(c0, n_cand, idx_base, stride_ik, b, base, L, q_pos, n_units, BT,
                                          stride_btb, stride_btp, max_pages, num_pages, BLOCK_SIZE, PAGE_SIZE,
                                          CAUSAL, PAGED, BLOCK_N)
        if WRITE_ROWS:
            offs_c = c0 + tl.arange(0, BLOCK_N)
            flat = tl.where(valid, page * PAGE_SIZE + row, -1)
            tl.store(ROWS + t64 * stride_rt + g64 * stride_rg + offs_c, flat,
                     mask=(offs_c < n_cand) & ((offs_c * 0 + writes_rows.to(tl.int32)) != 0))
        # A tile whose candidates are all dropped (the -1 padding of early causal tokens) costs nothing.
        if tl.sum(valid.to(tl.int32), 0) > 0:
            s, k_k, k_tail, k_rope = _bwd_key_tiles(KV + g64 * stride_kh + page * stride_kp + row * stride_kr,
                                                    KVR + g64 * stride_krh + page * stride_krp + row * stride_krr,
                                                    valid, q_k, q_tail, q_rope, offs_dk, dk_mask, stride_kd,
                                                    stride_krd, DQK, DV, DR, HAS_TAIL, BLOCK_DT, BLOCK_DR, F32_DOT)
            keep = h_mask[:, None] & valid[None, :]
            # where, not a product: a dropped candidate's weight is exactly 0 even if its score is NaN.
            p = tl.where(keep, tl.exp2(s * sm_scale_log2 - lse2[:, None]), 0.0)
            vt = k_k  # latent: the value is the key's first DV columns
            if HAS_DO and not LATENT:
                vt = load_rows(V + g64 * stride_vh + page * stride_vp + row * stride_vr, offs_dv, valid, dv_mask,
                               stride_vd)
            ds, pp = _bwd_dscores(p, keep, vt, do, delta, p_share, dlse, sm_scale, HAS_DO, HAS_DLSE, BLOCK_H,
                                  BLOCK_N, F32_DOT)
            dq_k += dot(ds.to(k_k.dtype), k_k, F32_DOT)
            dsT = tl.trans(ds)
            dk_k = dot(dsT.to(q_k.dtype), q_k, F32_DOT)
            dvals = dk_k  # without dO: never read
            if HAS_DO:
                dvals = dot(tl.trans(pp).to(do.dtype), do, F32_DOT)
            if HAS_DO and LATENT:
                dk_k += dvals  # BLOCK_DV == BLOCK_DK: the value is the key's first DV columns
            dk_tail = dk_k
            dk_rope = dk_k
            if HAS_TAIL:
                dq_tail += dot(ds.to(k_tail.dtype), k_tail, F32_DOT)
                dk_tail = dot(dsT.to(q_tail.dtype), q_tail, F32_DOT)
            if DR > 0:
                dq_rope += dot(ds.to(k_rope.dtype), k_rope, F32_DOT)
                dk_rope = dot(dsT.to(q_rope.dtype), q_rope, F32_DOT)
            if ATOMIC:
                _bwd_scatter(GK, GV, GKR, g64, page, row, valid, dk_k, dk_tail, dvals, dk_rope, offs_dk, dk_mask,
                             offs_dv, dv_mask, stride_gkp, stride_gkr, stride_gkh, stride_gkd, stride_gvp, stride_gvr,
                             stride_gvh, stride_gvd, stride_gkrp, stride_gkrr, stride_gkrh, stride_gkrd, DQK, DV, DR,
                             LATENT, HAS_TAIL, HAS_DO, BLOCK_DT, BLOCK_DR)

    _bwd_store_dq(DQ, DQR, t64, heads, h_mask, dq_k, dq_tail, dq_rope, offs_dk, dk_mask, stride_dqt, stride_dqh,
                  stride_dqd, stride_dqrt, stride_dqrh, stride_dqrd, DQK, DV, DR, HAS_TAIL, BLOCK_DT, BLOCK_DR)


@triton.jit
def _dkv_row(KV, V, KVR, g64, page, row, offs_dk, dk_mask, offs_dv, dv_mask, stride_kp, stride_kr, stride_kh,
             stride_kd, stride_vp, stride_vr, stride_vh, stride_vd, stride_krp, stride_krr, stride_krh, stride_krd,
             DQK: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, LATENT: tl.constexpr, HAS_TAIL: tl.constexpr,
             HAS_DO: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DR: tl.constexpr):
    """One cache row's parts in float32: (key [DK], latent tail, rope part, value); absent parts are
    returned as the key, never read."""
    k_row = KV + g64 * stride_kh + page * stride_kp + row * stride_kr
    k_k = tl.load(k_row + offs_dk.to(tl.int64) * stride_kd, mask=dk_mask, other=0.0).to(tl.float32)
    k_tail = k_k
    k_rope = k_k
    vt = k_k
    if HAS_TAIL:
        offs_dt = DV + tl.arange(0, BLOCK_DT)
        k_tail = tl.load(k_row + offs_dt.to(tl.int64) * stride_kd, mask=offs_dt < DQK, other=0.0).to(tl.float32)
    if DR > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        k_rope = tl.load(KVR + g64 * stride_krh + page * stride_krp + row * stride_krr
                         + offs_dr.to(tl.int64) * stride_krd, mask=offs_dr < DR, other=0.0).to(tl.float32)
    if HAS_DO and not LATENT:
        vt = tl.load(V + g64 * stride_vh + page * stride_vp + row * stride_vr + offs_dv.to(tl.int64) * stride_vd,
                     mask=dv_mask, other=0.0).to(tl.float32)
    return k_k, k_tail, k_rope, vt


@triton.jit
def _dkv_head_block(Q, QR, LSE, DELTA, DO, DLSE, SINK, t64, heads, h_mask, k_k, k_tail, k_rope, vt, gk, gt, gr, gv,
                    offs_dk, dk_mask, offs_dv, dv_mask, sm_scale, sm_scale_log2, stride_qt, stride_qh, stride_qd,
                    stride_qrt, stride_qrh, stride_qrd, stride_lt, stride_lh, stride_dt, stride_dh, stride_dot,
                    stride_doh, stride_dod, stride_dlt, stride_dlh, DQK: tl.constexpr, DV: tl.constexpr,
                    DR: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_SINK: tl.constexpr, HAS_DO: tl.constexpr,
                    HAS_DLSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DR: tl.constexpr):
    """One candidate's contribution, from one block of its token's heads, to the row's gradients: P and
    dS re-derived as vectors (the row against each head), added to (gk, gt, gr, gv), returned."""
    hrow = heads.to(tl.int64)
    q_base = Q + t64 * stride_qt + hrow * stride_qh
    q_k = load_rows(q_base, offs_dk, h_mask, dk_mask, stride_qd).to(tl.float32)
    s = tl.sum(q_k * k_k[None, :], 1)
    if HAS_TAIL:
        offs_dt = DV + tl.arange(0, BLOCK_DT)
        q_tail = load_rows(q_base, offs_dt, h_mask, offs_dt < DQK, stride_qd).to(tl.float32)
        s += tl.sum(q_tail * k_tail[None, :], 1)
    if DR > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        q_rope = load_rows(QR + t64 * stride_qrt + hrow * stride_qrh, offs_dr, h_mask, offs_dr < DR,
                           stride_qrd).to(tl.float32)
        s += tl.sum(q_rope * k_rope[None, :], 1)
    # A kept candidate's token has a finite (or NaN) lse, never -inf: no guard needed here.
    lse = tl.load(LSE + t64 * stride_lt + heads * stride_lh, mask=h_mask, other=0.0)
    p = tl.where(h_mask, tl.exp2(s * sm_scale_log2 - lse * JIT_LOG2E), 0.0)
    ds = tl.zeros([BLOCK_H], tl.float32)
    if HAS_DO:
        do = load_rows(DO + t64 * stride_dot + hrow * stride_doh, offs_dv, h_mask, dv_mask, stride_dod).to(tl.float32)
        delta = tl.load(DELTA + t64 * stride_dt + heads * stride_dh, mask=h_mask, other=0.0)
        pp = p
        if HAS_SINK:
            sink = tl.load(SINK + heads, mask=h_mask, other=0.0)
            pp = p / (1.0 + tl.exp2((sink - lse) * JIT_LOG2E))
        ds = pp * (tl.sum(do * vt[None, :], 1) - delta)
        gv += tl.sum(pp[:, None] * do, 0)
    if HAS_DLSE:
        dlse = tl.load(DLSE + t64 * stride_dlt + heads * stride_dlh, mask=h_mask, other=0.0)
        ds += dlse * p
    ds = tl.where(h_mask, ds * sm_scale, 0.0)
    gk += tl.sum(ds[:, None] * q_k, 0)
    if HAS_TAIL:
        gt += tl.sum(ds[:, None] * q_tail, 0)
    if DR > 0:
        gr += tl.sum(ds[:, None] * q_rope, 0)
    return gk, gt, gr, gv


@triton.jit
def selective_attention_bwd_dkv_kernel(
    Q, KV, V, QR, KVR, LSE, DELTA, DO, DLSE, SINK, PERM, SEG,
    GK, GV, GKR,
    sm_scale, n_cand, n_rows,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    stride_qrt, stride_qrh, stride_qrd,
    stride_krp, stride_krr, stride_krh, stride_krd,
    stride_lt, stride_lh, stride_dt, stride_dh,
    stride_dot, stride_doh, stride_dod, stride_dlt, stride_dlh,
    stride_gkp, stride_gkr, stride_gkh, stride_gkd,
    stride_gvp, stride_gvr, stride_gvh, stride_gvd,
    stride_gkrp, stride_gkrr, stride_gkrh, stride_gkrd,
    stride_pg, stride_sg,
    HG: tl.constexpr, DQK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
    LATENT: tl.constexpr, HAS_TAIL: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, HAS_SINK: tl.constexpr, HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr,
    NUM_HB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Deterministic key/value gradients: one program per flat cache row r x kv head g.

    PERM lists the candidates (token * n_cand + c) sorted by the row they name (stable, so in token
    order), SEG[r] .. SEG[r + 1] the stretch naming row r. The program re-derives each candidate's
    P and dS from q, lse and dO of its token (vectors: one row against the token's heads,
    _dkv_head_block) and sums in that fixed order; it alone writes row r, so no atomics. A row no kept
    candidate names (an unused page, a row past the last sequence) is neither read nor written: its
    gradient stays 0."""
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    seg = SEG + g.to(tl.int64) * stride_sg + r
    lo = tl.load(seg)
    hi = tl.load(seg + 1)
    if hi > lo:
        offs_dk = tl.arange(0, BLOCK_DK)
        dk_mask = offs_dk < DK
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_mask = offs_dv < DV
        if PAGED:
            page = r // PAGE_SIZE
            row = r % PAGE_SIZE
        else:  # contiguous: the flat row is the row (the page stride is 0)
            page = r * 0
            row = r
        g64 = g.to(tl.int64)
        k_k, k_tail, k_rope, vt = _dkv_row(KV, V, KVR, g64, page, row, offs_dk, dk_mask, offs_dv, dv_mask, stride_kp,
                                           stride_kr, stride_kh, stride_kd, stride_vp, stride_vr, stride_vh, stride_vd,
                                           stride_krp, stride_krr, stride_krh, stride_krd, DQK, DV, DR, LATENT,
                                           HAS_TAIL, HAS_DO, BLOCK_DT, BLOCK_DR)
        gk = tl.zeros([BLOCK_DK], tl.float32)
        gt = tl.zeros([BLOCK_DT], tl.float32)
        gr = tl.zeros([BLOCK_DR], tl.float32)
        gv = tl.zeros([BLOCK_DV], tl.float32)
        sm_scale_log2 = sm_scale * JIT_LOG2E
        for e in range(lo, hi):
            t64 = tl.load(PERM + g64 * stride_pg + e) // n_cand
            for hb in range(0, NUM_HB):
                offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
                gk, gt, gr, gv = _dkv_head_block(
                    Q, QR, LSE, DELTA, DO, DLSE, SINK, t64, g * HG + offs_h, offs_h < HG, k_k, k_tail, k_rope, vt,
                    gk, gt, gr, gv, offs_dk, dk_mask, offs_dv, dv_mask, sm_scale, sm_scale_log2, stride_qt,
                    stride_qh, stride_qd, stride_qrt, stride_qrh, stride_qrd, stride_lt, stride_lh, stride_dt,
                    stride_dh, stride_dot, stride_doh, stride_dod, stride_dlt, stride_dlh, DQK, DV, DR, HAS_TAIL,
                    HAS_SINK, HAS_DO, HAS_DLSE, BLOCK_H, BLOCK_DT, BLOCK_DR)
        gk_row = GK + g64 * stride_gkh + page * stride_gkp + row * stride_gkr
        if HAS_DO and LATENT:
            gk += gv
        tl.store(gk_row + offs_dk.to(tl.int64) * stride_gkd, gk, mask=dk_mask)
        if HAS_TAIL:
            offs_dt = DV + tl.arange(0, BLOCK_DT)
            tl.store(gk_row + offs_dt.to(tl.int64) * stride_gkd, gt, mask=offs_dt < DQK)
        if HAS_DO and not LATENT:
            tl.store(GV + g64 * stride_gvh + page * stride_gvp + row * stride_gvr + offs_dv.to(tl.int64) * stride_gvd,
                     gv, mask=dv_mask)
        if DR > 0:
            offs_dr = tl.arange(0, BLOCK_DR)
            gkr_row = GKR + g64 * stride_gkrh + page * stride_gkrp + row * stride_gkrr
            tl.store(gkr_row + offs_dr.to(tl.int64) * stride_gkrd, gr, mask=offs_dr < DR)
