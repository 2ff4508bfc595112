"""Triton kernels of the selective-attention forward (docs/spec.md section 1).

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

from .jit_common import (JIT_LN2, JIT_LOG2E, candidate_positions, candidate_rows, dot, load_q_parts, load_rows,
                         sequence_facts)
from .merge import merge_states_tile


@triton.jit
def _kept_end(c_start, c_end, idx_base, stride_ik, L, q_pos, n_units, BLOCK_SIZE: tl.constexpr,
              CAUSAL: tl.constexpr, CHUNK: tl.constexpr):
    """One past the last candidate of [c_start, c_end) that the indices, length and causality keep
    (c_start when none). Candidates past it are all dropped, so a tile loop may stop there: the -1
    padding of a causal prefill's early tokens costs no tile. This replaces a per-tile
    "any kept?" branch, which kept the gather out of the software pipeline (a load under an
    scf.if is not pipelined) and cost registers on sm_90 (docs/triton.md)."""
    end = c_start
    for c0 in range(c_start, c_end, CHUNK):
        offs_c = c0 + tl.arange(0, CHUNK)
        valid, pos = candidate_positions(offs_c, c_end, idx_base, stride_ik, L, q_pos, n_units, BLOCK_SIZE,
                                          CAUSAL)
        end = tl.maximum(end, tl.max(tl.where(valid, offs_c + 1, 0), 0))
    return end


@triton.jit
def _round_bf16(x):
    """float32 -> bfloat16 rounded to nearest even, on the bits. Triton 3.9's interpreter truncates in
    ``.to(tl.bfloat16)`` (and its "rtne" mode rounds ties up without carrying), where GPUs round to
    nearest even; truncation biases bf16 outputs low (docs/traps.md)."""
    b = x.to(tl.uint32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    r = tl.where(x != x, b | 0x400000, r)  # NaN stays a quiet NaN (the carry could reach the sign)
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_out(x, OUT, RTNE_BF16: tl.constexpr):
    """x cast to OUT's element type; RTNE_BF16 (interpreter with bfloat16 outputs) rounds as a GPU does."""
    if RTNE_BF16:
        y = _round_bf16(x)
    else:
        y = x.to(OUT.dtype.element_ty)
    return y


@triton.jit
def _write_result(acc, m_i, l_i, n_kept, t, pid_s, heads, h_mask, offs_dv, dv_mask, dvb, SINK,
                  OUT, LSE, OPART, LPART, stride_ot, stride_oh, stride_od, stride_lt, stride_lh,
                  stride_ops, stride_opt, stride_oph, stride_opd, stride_lps, stride_lpt, stride_lph,
                  HAS_SINK: tl.constexpr, SPLIT: tl.constexpr, RTNE_BF16: tl.constexpr):
    """The epilogue of both forward kernels: the sink rule, empty rows, the natural-log LSE, or the
    partial (normalised output, base-2 LSE) of one split for the combine kernel.

    ``n_kept`` counts kept candidates from indices and lengths alone: a row is empty when it is 0,
    never because of its scores (a NaN/inf in a kept row propagates to out and lse, docs/spec.md).
    Only the program of value block 0 (``dvb``) writes the LSE."""
    nonempty = (heads * 0 + n_kept) > 0
    write_lse = h_mask & ((heads * 0 + dvb) == 0)
    if SPLIT:
        # Partial result of this split: normalised output and its base-2 LSE; the combine kernel
        # weights the splits by exp2(lse2) and applies the sink once.
        o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        op = (OPART + pid_s.to(tl.int64) * stride_ops + t.to(tl.int64) * stride_opt
              + heads[:, None].to(tl.int64) * stride_oph + offs_dv[None, :] * stride_opd)
        tl.store(op, o, mask=h_mask[:, None] & dv_mask[None, :])
        lp = LPART + pid_s.to(tl.int64) * stride_lps + t.to(tl.int64) * stride_lpt + heads * stride_lph
        tl.store(lp, lse2, mask=write_lse)
    else:
        # -inf max: empty row, or kept candidates that all score -inf (their terms are exact zeros).
        m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
        denom = l_i
        if HAS_SINK:
            sink2 = tl.load(SINK + heads, mask=h_mask, other=0.0) * JIT_LOG2E
            denom = denom + tl.exp2(sink2 - m_fin)
        # A kept row with finite scores has l >= 1 (its max term is exp2(0)); an empty one has acc = 0,
        # divided by 1: out 0. NaN in l or acc (NaN/inf in a kept row) is left to propagate.
        denom = tl.where(nonempty, denom, 1.0)
        o = acc / denom[:, None]
        op = OUT + t.to(tl.int64) * stride_ot + heads[:, None].to(tl.int64) * stride_oh + offs_dv[None, :] * stride_od
        tl.store(op, _to_out(o, OUT, RTNE_BF16), mask=h_mask[:, None] & dv_mask[None, :])
        lse = tl.where(nonempty, (m_fin + tl.log2(tl.where(nonempty, l_i, 1.0))) * JIT_LN2, float("-inf"))
        tl.store(LSE + t.to(tl.int64) * stride_lt + heads * stride_lh, lse, mask=write_lse)


@triton.jit
def _online_softmax(s, valid, m_i, l_i, sm_scale_log2):
    """One tile of the online softmax in base 2: (p, alpha, new max, new sum). An all-dropped tile
    leaves the max at -inf, and 0 is subtracted there, never -inf - (-inf)."""
    s = tl.where(valid[None, :], s * sm_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _dequantize(x, s_rows, c0, offs_c, valid, c_mask, stride_sd, n_scales, LIKE, SCALE_BLOCK: tl.constexpr,
                BLOCK_C: tl.constexpr, ROWS_FIRST: tl.constexpr, ALIGNED: tl.constexpr, F32_DOT: tl.constexpr):
    """The values of a gathered tile of a quantized cache: stored (float8_e4m3fn / int8)
    times the float32 scale of each element's tile of SCALE_BLOCK columns, cast to LIKE's element
    type (q's: the dot's operand type, as FlashMLA rounds its dequantized fp8 to bf16) unless the dot
    runs in float32 (F32_DOT).

    x holds columns ``offs_c`` (c0 = the first) of the candidate rows whose scale rows start at
    ``s_rows``; rows are axis 0 when ROWS_FIRST, else axis 1. ALIGNED: c0 is a multiple of BLOCK_C.
    Scales are loaded per (row, tile), not per column, when the tiles allow it:
    - the run lies inside one scale tile (ALIGNED, SCALE_BLOCK a multiple of BLOCK_C): one scale a row;
    - the run is whole tiles, at most 8 (ALIGNED, BLOCK_C a multiple of SCALE_BLOCK; DeepSeek's
      512 = 4 x 128): one [rows] load per tile;
    - otherwise (any scale_block, e.g. 12): one scale load per column.
    A dropped row's scale is never read (a garbage row may carry NaN scales): it is 0 and its
    stored values were loaded as 0."""
    if ALIGNED and SCALE_BLOCK % BLOCK_C == 0:
        sc = tl.load(s_rows + (c0 // SCALE_BLOCK) * stride_sd, mask=valid, other=0.0)
        if ROWS_FIRST:
            y = x.to(tl.float32) * sc[:, None]
        else:
            y = x.to(tl.float32) * sc[None, :]
    elif ALIGNED and (BLOCK_C % SCALE_BLOCK == 0 and BLOCK_C // SCALE_BLOCK <= 8):  # triton-ascend 3.2: no A and B and C
        # Whole tiles (DeepSeek: 512 = 4 x 128): one [rows] scale load per tile, selected per column
        # elementwise (a reshape to [rows, tiles, SCALE_BLOCK] spilled 448-1840 B on sm_90: docs/triton.md).
        tile = (offs_c - c0) // SCALE_BLOCK
        first = c0 // SCALE_BLOCK
        xf = x.to(tl.float32)
        y = xf
        for i in tl.static_range(BLOCK_C // SCALE_BLOCK):
            in_range = tl.full(valid.shape, first + i, tl.int32) < n_scales  # a padded last tile has no scale
            sc = tl.load(s_rows + (first + i) * stride_sd, mask=valid & in_range, other=0.0)
            if ROWS_FIRST:
                y = tl.where(tile[None, :] == i, xf * sc[:, None], y)
            else:
                y = tl.where(tile[:, None] == i, xf * sc[None, :], y)
    else:
        tiles = (offs_c // SCALE_BLOCK).to(tl.int64)
        if ROWS_FIRST:
            sc = tl.load(s_rows[:, None] + tiles[None, :] * stride_sd, mask=valid[:, None] & c_mask[None, :],
                         other=0.0)
        else:
            sc = tl.load(s_rows[None, :] + tiles[:, None] * stride_sd, mask=valid[None, :] & c_mask[:, None],
                         other=0.0)
        y = x.to(tl.float32) * sc
    if not F32_DOT:
        y = y.to(LIKE.dtype.element_ty)
    return y


@triton.jit
def _gather_t(head, rows, offs_d, stride_d, valid, d_mask, GATHER_ROWS: tl.constexpr):
    """Columns ``offs_d`` of the candidate rows ``rows`` as a transposed key chunk [BLOCK_D, BLOCK_N]
    (masked: a dropped row is never read).

    GATHER_ROWS loads it as rows [BLOCK_N, BLOCK_D] and transposes on chip. triton-ascend lowers that
    form to one contiguous row copy per candidate; the column form (the default, what the NVIDIA
    compiles and their budgets in docs/triton.md were measured with) becomes a scalar loop over the
    feature dimension inside the candidate loop, one element per load (docs/triton.md "Ascend")."""
    if GATHER_ROWS:
        kc = tl.trans(tl.load(head + rows[:, None] + offs_d[None, :].to(tl.int64) * stride_d,
                              mask=valid[:, None] & d_mask[None, :], other=0.0))
    else:
        kc = tl.load(head + rows[None, :] + offs_d[:, None].to(tl.int64) * stride_d,
                     mask=valid[None, :] & d_mask[:, None], other=0.0)
    return kc


@triton.jit
def _program_block(pid1, HG: tl.constexpr, DV: tl.constexpr, NUM_HB: tl.constexpr, NUM_DVB: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What grid axis 1 (kv head x head block x value block) gives a program of either forward kernel:
    (kv head g, value block, its query heads and their mask, its value columns and their mask). The
    latent kernel has one value block (NUM_DVB 1)."""
    g = pid1 // (NUM_HB * NUM_DVB)
    hb = (pid1 // NUM_DVB) % NUM_HB
    dvb = pid1 % NUM_DVB
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_dv = dvb * BLOCK_DV + tl.arange(0, BLOCK_DV)
    return g, dvb, g * HG + offs_h, offs_h < HG, offs_dv, offs_dv < DV


@triton.jit
def _general_scores(q_base, qr_base, k_head, kr_head, k_row, kr_row, ks_rows, valid, h_mask, Q, n_kscales,
                    stride_qd, stride_qrd, stride_kd, stride_krd, stride_ksd, DQK: tl.constexpr, DR: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DR: tl.constexpr,
                    GATHER_ROWS: tl.constexpr, KV_QUANT: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                    F32_DOT: tl.constexpr):
    """The general kernel's scores of one tile, [BLOCK_H, BLOCK_N], unscaled: head widths walked in
    power-of-two chunks (576 = 9 x 64), then the split rope part in chunks of BLOCK_DR.

    A runtime loop, not static_range: unrolled, the compiler hoists all of q (64 heads x 576,
    loop-invariant) into registers and spills (measured: 255 regs + 816 B stack on sm_90 for
    BLOCK_H=64, BLOCK_DV=256, 8 warps; 0 B with this loop). q chunks are re-read from L1/L2."""
    s = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    for d0 in range(0, DQK, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < DQK
        qc = tl.load(q_base + offs_d[None, :].to(tl.int64) * stride_qd, mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        kc = _gather_t(k_head, k_row, offs_d, stride_kd, valid, d_mask, GATHER_ROWS)
        if KV_QUANT:
            kc = _dequantize(kc, ks_rows, d0, offs_d, valid, d_mask, stride_ksd, n_kscales, Q, SCALE_BLOCK,
                             BLOCK_D, False, True, F32_DOT)
        s += dot(qc, kc, F32_DOT)
    if DR > 0:
        for d0 in range(0, DR, BLOCK_DR):
            offs_d = d0 + tl.arange(0, BLOCK_DR)
            d_mask = offs_d < DR
            qc = tl.load(qr_base + offs_d[None, :].to(tl.int64) * stride_qrd, mask=h_mask[:, None] & d_mask[None, :],
                         other=0.0)
            kc = _gather_t(kr_head, kr_row, offs_d, stride_krd, valid, d_mask, GATHER_ROWS)
            s += dot(qc, kc, F32_DOT)
    return s


@triton.jit
def selective_attention_fwd_kernel(
    Q, KV, V, QR, KVR, IDX, SINK, BT, CUQ, CUK, SEQK,
    OUT, LSE, OPART, LPART, KS, VS,
    sm_scale_log2, T, t_start, B, S_total, num_pages, max_pages, n_cand, cand_per_split, n_kscales, n_vscales,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    stride_ksp, stride_ksr, stride_ksh, stride_ksd,
    stride_vsp, stride_vsr, stride_vsh, stride_vsd,
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
    BLOCK_DV: tl.constexpr, RTNE_BF16: tl.constexpr = False, GATHER_ROWS: tl.constexpr = False,
    KV_QUANT: tl.constexpr = False, V_QUANT: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 1,
):
    """The general kernel: any widths, separate V, value blocks (docs/triton.md). KV_QUANT / V_QUANT:
    kv / v stored as float8_e4m3fn or int8 with tile scales KS / VS (kv's / v's leading shape +
    [n_kscales / n_vscales]), dequantized in registers after the masked gather (_dequantize)."""
    t = t_start + tl.program_id(0)  # t_start: the launcher splits grids over a device's program limit
    pid_s = tl.program_id(2)
    g, dvb, heads, h_mask, offs_dv, dv_mask = _program_block(tl.program_id(1), HG, DV, NUM_HB, NUM_DVB, BLOCK_H,
                                                             BLOCK_DV)
    b, base, L, q_pos, n_units = sequence_facts(t, CUQ, CUK, SEQK, T, B, S_total, VARLEN, HAS_CUK, PAGED,
                                                SEARCH_STEPS, BLOCK_SIZE)
    q_base = Q + t.to(tl.int64) * stride_qt + heads[:, None].to(tl.int64) * stride_qh
    qr_base = QR + t.to(tl.int64) * stride_qrt + heads[:, None].to(tl.int64) * stride_qrh
    idx_base = IDX + t.to(tl.int64) * stride_it + g.to(tl.int64) * stride_ig
    k_head = KV + g.to(tl.int64) * stride_kh
    kr_head = KVR + g.to(tl.int64) * stride_krh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    # Kept candidates counted from indices and lengths alone: a row is empty when this stays 0, never
    # because of its scores (a NaN/inf in a kept row must propagate to out and lse, docs/spec.md section 1).
    n_kept = t * 0

    c_start = pid_s * cand_per_split
    c_end = tl.minimum(c_start + cand_per_split, n_cand)
    for c0 in range(c_start, c_end, BLOCK_N):
        valid, page, row = candidate_rows(c0, c_end, idx_base, stride_ik, b, base, L, q_pos, n_units, BT,
                                          stride_btb, stride_btp, max_pages, num_pages, BLOCK_SIZE, PAGE_SIZE,
                                          CAUSAL, PAGED, BLOCK_N)
        n_kept += tl.sum(valid.to(tl.int32), 0)
        s = _general_scores(q_base, qr_base, k_head, kr_head, page * stride_kp + row * stride_kr,
                            page * stride_krp + row * stride_krr,
                            KS + g.to(tl.int64) * stride_ksh + page * stride_ksp + row * stride_ksr, valid, h_mask, Q,
                            n_kscales, stride_qd, stride_qrd, stride_kd, stride_krd, stride_ksd, DQK, DR, BLOCK_H,
                            BLOCK_N, BLOCK_D, BLOCK_DR, GATHER_ROWS, KV_QUANT, SCALE_BLOCK, F32_DOT)
        p, alpha, m_new, l_i = _online_softmax(s, valid, m_i, l_i, sm_scale_log2)
        # Masked load: a dropped row is never read, so NaN in an unused page cannot reach acc.
        vt = load_rows(V + g.to(tl.int64) * stride_vh + page * stride_vp + row * stride_vr, offs_dv, valid, dv_mask,
                       stride_vd)
        if V_QUANT:  # latent mode: V is KV and VS is KS
            vs_rows = VS + g.to(tl.int64) * stride_vsh + page * stride_vsp + row * stride_vsr
            vt = _dequantize(vt, vs_rows, dvb * BLOCK_DV, offs_dv, valid, dv_mask, stride_vsd, n_vscales, Q,
                             SCALE_BLOCK, BLOCK_DV, True, True, F32_DOT)
        acc = acc * alpha[:, None] + dot(p.to(vt.dtype), vt, F32_DOT)
        m_i = m_new

    _write_result(acc, m_i, l_i, n_kept, t, pid_s, heads, h_mask, offs_dv, dv_mask, dvb, SINK, OUT, LSE, OPART,
                  LPART, stride_ot, stride_oh, stride_od, stride_lt, stride_lh, stride_ops, stride_opt, stride_oph,
                  stride_opd, stride_lps, stride_lpt, stride_lph, HAS_SINK, SPLIT, RTNE_BF16)


@triton.jit
def _latent_tile(k_row, kr_row, ks_rows, valid, offs_dv, dv_mask, q_nope, q_tail, q_rope, Q, n_kscales, stride_kd,
                 stride_krd, stride_ksd, DQK: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_DR: tl.constexpr, KV_QUANT: tl.constexpr,
                 SCALE_BLOCK: tl.constexpr, F32_DOT: tl.constexpr):
    """One gathered tile of the latent kernel: (scores [BLOCK_H, BLOCK_N] unscaled, k_nope [BLOCK_N, DV]).
    k_nope is the value too (dequantized once when KV_QUANT): the caller's p . v reads the same tile.

    Masked gathers: a dropped row is never read, so NaN in an unused page cannot reach acc. Scores
    are computed transposed, [BLOCK_N, BLOCK_H] = k . q^T: with 32-row tiles this is an M=32 product
    (mma.sync), which compiles for sm_90 without spilling on triton 3.6 and 3.9; q . k^T (a wgmma with
    q's loop-invariant shared-memory descriptors held in registers) spills 96-168 B on 3.9
    (docs/triton.md, compile budgets)."""
    k_nope = load_rows(k_row, offs_dv, valid, dv_mask, stride_kd)
    if KV_QUANT:
        k_nope = _dequantize(k_nope, ks_rows, 0, offs_dv, valid, dv_mask, stride_ksd, n_kscales, Q, SCALE_BLOCK,
                             BLOCK_DV, True, True, F32_DOT)
    s = dot(k_nope, tl.trans(q_nope), F32_DOT)
    if DQK > DV:
        offs_dt = DV + tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt < DQK
        k_tail = load_rows(k_row, offs_dt, valid, dt_mask, stride_kd)
        if KV_QUANT:
            k_tail = _dequantize(k_tail, ks_rows, DV, offs_dt, valid, dt_mask, stride_ksd, n_kscales, Q,
                                 SCALE_BLOCK, BLOCK_DT, True, DV % BLOCK_DT == 0, F32_DOT)
        s += dot(k_tail, tl.trans(q_tail), F32_DOT)
    if DR > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        k_rope = load_rows(kr_row, offs_dr, valid, offs_dr < DR, stride_krd)
        s += dot(k_rope, tl.trans(q_rope), F32_DOT)
    return tl.trans(s), k_nope


@triton.jit
def selective_attention_latent_kernel(
    Q, KV, QR, KVR, IDX, SINK, BT, CUQ, CUK, SEQK, OUT, LSE, OPART, LPART, KS,
    sm_scale_log2, T, t_start, B, S_total, num_pages, max_pages, n_cand, cand_per_split, n_kscales,
    stride_qt, stride_qh, stride_qd, stride_kp, stride_kr, stride_kh, stride_kd,
    stride_ksp, stride_ksr, stride_ksh, stride_ksd,
    stride_qrt, stride_qrh, stride_qrd, stride_krp, stride_krr, stride_krh, stride_krd,
    stride_it, stride_ig, stride_ik, stride_btb, stride_btp,
    stride_ot, stride_oh, stride_od, stride_lt, stride_lh,
    stride_ops, stride_opt, stride_oph, stride_opd, stride_lps, stride_lpt, stride_lph,
    HG: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGE_SIZE: tl.constexpr,
    VARLEN: tl.constexpr, HAS_CUK: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SINK: tl.constexpr, SPLIT: tl.constexpr, SEARCH_STEPS: tl.constexpr, F32_DOT: tl.constexpr,
    NUM_HB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DT: tl.constexpr, BLOCK_DR: tl.constexpr, NUM_STAGES: tl.constexpr, KEPT_CHUNK: tl.constexpr,
    RTNE_BF16: tl.constexpr = False, KV_QUANT: tl.constexpr = False, SCALE_BLOCK: tl.constexpr = 1,
):
    """Latent (MLA) mode, value = the first DV columns of the key row: FlashMLA's data flow.

    One program = one query token x one kv head x one block of BLOCK_H query heads (x one split).
    Each tile of BLOCK_N selected rows is gathered once, as k_nope [BLOCK_N, DV] (the value, reused
    for P.V) and the tail k_tail [BLOCK_N, DQK - DV] (DeepSeek's 64 rope columns inside the 576-wide
    row), plus the split rope part kv_rope when given (_latent_tile). q is loaded once per program
    (load_q_parts). No value split: the [BLOCK_H, BLOCK_DV] float32 accumulator stays on chip, so the
    scores are computed once per tile. The tiles past the last kept candidate (the -1 padding of
    early causal tokens) are not run: a first pass over the indices (KEPT_CHUNK at a time) finds
    where the kept candidates end. The tile loop is software-pipelined NUM_STAGES deep, so the
    gather of tile i+1 overlaps the dots of tile i. KV_QUANT: kv stored as float8_e4m3fn / int8 with
    tile scales KS; each gathered tile is dequantized once in registers (_dequantize) and serves both
    products, as the unquantized tile does.
    """
    t = t_start + tl.program_id(0)  # t_start: the launcher splits grids over a device's program limit
    pid_s = tl.program_id(2)
    g, dvb, heads, h_mask, offs_dv, dv_mask = _program_block(tl.program_id(1), HG, DV, NUM_HB, 1, BLOCK_H, BLOCK_DV)
    b, base, L, q_pos, n_units = sequence_facts(t, CUQ, CUK, SEQK, T, B, S_total, VARLEN, HAS_CUK, PAGED,
                                                SEARCH_STEPS, BLOCK_SIZE)
    q_nope, q_tail, q_rope = load_q_parts(Q, QR, t, heads, h_mask, offs_dv, dv_mask, stride_qt, stride_qh, stride_qd,
                                          stride_qrt, stride_qrh, stride_qrd, DQK, DV, DR, BLOCK_DT, BLOCK_DR)
    idx_base = IDX + t.to(tl.int64) * stride_it + g.to(tl.int64) * stride_ig
    k_head = KV + g.to(tl.int64) * stride_kh
    kr_head = KVR + g.to(tl.int64) * stride_krh
    ks_head = KS + g.to(tl.int64) * stride_ksh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    n_kept = t * 0

    c_start = pid_s * cand_per_split
    c_end = tl.minimum(c_start + cand_per_split, n_cand)
    # Tiles past the last kept candidate are skipped (the -1 padding of early causal tokens); a
    # dropped tile inside the range still runs, masked. The loop itself has no branch, so the
    # gather of tile i+1 is pipelined under the dots of tile i.
    c_stop = _kept_end(c_start, c_end, idx_base, stride_ik, L, q_pos, n_units, BLOCK_SIZE, CAUSAL, KEPT_CHUNK)
    for c0 in tl.range(c_start, c_stop, BLOCK_N, num_stages=NUM_STAGES):
        valid, page, row = candidate_rows(c0, c_stop, idx_base, stride_ik, b, base, L, q_pos, n_units, BT,
                                          stride_btb, stride_btp, max_pages, num_pages, BLOCK_SIZE, PAGE_SIZE,
                                          CAUSAL, PAGED, BLOCK_N)
        n_kept += tl.sum(valid.to(tl.int32), 0)
        s, k_nope = _latent_tile(k_head + page * stride_kp + row * stride_kr,
                                 kr_head + page * stride_krp + row * stride_krr,
                                 ks_head + page * stride_ksp + row * stride_ksr, valid, offs_dv, dv_mask, q_nope,
                                 q_tail, q_rope, Q, n_kscales, stride_kd, stride_krd, stride_ksd, DQK, DV, DR,
                                 BLOCK_DV, BLOCK_DT, BLOCK_DR, KV_QUANT, SCALE_BLOCK, F32_DOT)
        p, alpha, m_new, l_i = _online_softmax(s, valid, m_i, l_i, sm_scale_log2)
        acc = acc * alpha[:, None] + dot(p.to(k_nope.dtype), k_nope, F32_DOT)
        m_i = m_new

    _write_result(acc, m_i, l_i, n_kept, t, pid_s, heads, h_mask, offs_dv, dv_mask, dvb, SINK, OUT, LSE, OPART,
                  LPART, stride_ot, stride_oh, stride_od, stride_lt, stride_lh, stride_ops, stride_opt, stride_oph,
                  stride_opd, stride_lps, stride_lpt, stride_lph, HAS_SINK, SPLIT, RTNE_BF16)


@triton.jit
def selective_attention_combine_kernel(
    OPART, LPART, SINK, OUT, LSE, H, num_splits, t_start,
    stride_ops, stride_opt, stride_oph, stride_opd,
    stride_lps, stride_lpt, stride_lph,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    DV: tl.constexpr, HAS_SINK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
    RTNE_BF16: tl.constexpr = False,
):
    """Flash-decoding combine of the splits' partial (out, base-2 lse): docs/spec.md section 6, computed by
    merge.py's ``merge_states_tile`` (the one merge of partial states, shared with
    ``merge_attention_states``), in a fixed split order (deterministic). The sink is contiguous [H]."""
    t = t_start + tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    out, lse = merge_states_tile(OPART, LPART, SINK, t, offs_h, h_mask, offs_dv, dv_mask, num_splits,
                                 stride_ops, stride_opt, stride_oph, stride_opd, stride_lps, stride_lpt, stride_lph, 1,
                                 HAS_SINK=HAS_SINK, LSE_BASE2=True, BLOCK_H=BLOCK_H, BLOCK_DV=BLOCK_DV)
    t64 = t.to(tl.int64)
    tl.store(OUT + t64 * stride_ot + offs_h[:, None] * stride_oh + offs_dv[None, :] * stride_od,
             _to_out(out, OUT, RTNE_BF16), mask=h_mask[:, None] & dv_mask[None, :])
    tl.store(LSE + t64 * stride_lt + offs_h * stride_lh, lse, mask=h_mask & ((offs_h * 0 + tl.program_id(2)) == 0))
