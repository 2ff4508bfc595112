"""Triton kernels of the selection backend (see selection.py for the design).

Kept apart from the backend class so that ``import attention`` never imports triton: the
interpreter mode (TRITON_INTERPRET=1) must be chosen before triton is first imported, and CLIs like
``python -m attention.tune --device cpu`` set it after ``attention`` is already loaded.
"""

import triton
import triton.language as tl


@triton.jit
def _score_tile(q, w, qs, k_ptr, stride_k, ks_ptr, stride_ks0, stride_ks1, table_ptr, stride_tb, seq, L, q_pos,
                base, lo, hi, p0, num_pages, page_size, max_pages, Di, scale, CAUSAL: tl.constexpr,
                PAGED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
                QSCALE: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores [BLOCK_N] of positions p0 + [0, BLOCK_N) for one token (q [BLOCK_H, BLOCK_D]).

    QUANT: k_idx is float8_e4m3fn / int8 with one float32 scale per row (ks_ptr, strides per page and
    row, or per row); QSCALE: qs [BLOCK_H] holds q_idx's per-head scales. The stored values enter the
    dot as they are (exactly representable in bfloat16, or float32 when upcast) and both scales are
    applied to the [BLOCK_H, BLOCK_N] logits, before the relu: the dequantized product, one rounding.
    WINDOW: only positions in [lo, hi) (the token's cu_seqlen_ks / cu_seqlen_ke).
    """
    pos = p0 + tl.arange(0, BLOCK_N).to(tl.int64)
    valid = pos < L
    if CAUSAL:
        valid = valid & (pos <= q_pos)
    if WINDOW:
        valid = valid & (pos >= lo) & (pos < hi)
    if PAGED:
        pidx = tl.minimum(pos // page_size, max_pages - 1)
        page = tl.load(table_ptr + seq * stride_tb + pidx, mask=valid, other=0).to(tl.int64)
        valid = valid & (page >= 0) & (page < num_pages)
        rows = page * page_size + pos % page_size
        srows = page * stride_ks0 + (pos % page_size) * stride_ks1
    else:
        rows = base + pos
        srows = rows * stride_ks0
    rows = tl.where(valid, rows, 0)
    d = tl.arange(0, BLOCK_D)
    keys = tl.load(k_ptr + rows[:, None] * stride_k + d[None, :], mask=valid[:, None] & (d[None, :] < Di),
                   other=0.0)
    if UPCAST:
        keys = keys.to(tl.float32)
    elif QUANT:
        keys = keys.to(tl.bfloat16)  # exact: e4m3 and int8 values fit bfloat16's 8-bit significand
    if IEEE:
        logits = tl.dot(q, tl.trans(keys), input_precision="ieee")  # [BLOCK_H, BLOCK_N]
    else:
        logits = tl.dot(q, tl.trans(keys))
    if QUANT:
        # the scale of an invalid row is never read (0 instead; the score is masked below anyway)
        k_scale = tl.load(ks_ptr + tl.where(valid, srows, 0), mask=valid, other=0.0)
        logits = logits * k_scale[None, :]
    if QSCALE:
        logits = logits * qs[:, None]  # qs = scale * q_idx_scale: one multiply per logit
    else:
        logits = logits * scale
    logits = tl.maximum(logits, 0.0)
    s = tl.sum(w[:, None] * logits, axis=0)
    return tl.where(valid, s, float("-inf")), pos

@triton.jit
def _load_query(q_ptr, w_ptr, qs_ptr, t, stride_qt, stride_qh, stride_wt, stride_qst, stride_qsh, Hi, Di, scale,
                UPCAST: tl.constexpr, QUANT: tl.constexpr, QSCALE: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :],
                mask=(h[:, None] < Hi) & (d[None, :] < Di), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    elif QUANT:
        q = q.to(tl.bfloat16)
    w = tl.load(w_ptr + t * stride_wt + h, mask=h < Hi, other=0.0).to(tl.float32)
    if QSCALE:
        qs = tl.load(qs_ptr + t * stride_qst + h * stride_qsh, mask=h < Hi, other=0.0) * scale
    else:
        qs = w  # unused
    return q, w, qs

@triton.jit
def _window(ks_ptr, ke_ptr, t, WINDOW: tl.constexpr):
    """The token's key window [lo, hi) (vLLM's cu_seqlen_ks / cu_seqlen_ke); everything without one."""
    if WINDOW:
        lo = tl.load(ks_ptr + t).to(tl.int64)
        hi = tl.load(ke_ptr + t).to(tl.int64)
    else:
        lo = tl.zeros([], dtype=tl.int64)
        hi = tl.zeros([], dtype=tl.int64) + 9223372036854775807
    return lo, hi

@triton.jit
def _indexer_kernel(q_ptr, k_ptr, w_ptr, out_ptr, L_ptr, qpos_ptr, base_ptr, seq_ptr, table_ptr,
                    qs_ptr, ks_ptr, wlo_ptr, whi_ptr,
                    stride_qt, stride_qh, stride_k, stride_wt, stride_ot, stride_tb, stride_qst, stride_qsh,
                    stride_ks0, stride_ks1, W, Hi, Di, scale,
                    num_pages, page_size, max_pages, t_start, CAUSAL: tl.constexpr, PAGED: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr, QSCALE: tl.constexpr,
                    WINDOW: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    t = t_start + tl.program_id(0).to(tl.int64)  # t_start: grids split under a program limit
    p0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    L = tl.load(L_ptr + t)
    q_pos = tl.load(qpos_ptr + t)
    if PAGED:
        seq = tl.load(seq_ptr + t)
        base = 0
    else:
        seq = 0
        base = tl.load(base_ptr + t)
    q, w, qs = _load_query(q_ptr, w_ptr, qs_ptr, t, stride_qt, stride_qh, stride_wt, stride_qst, stride_qsh, Hi,
                           Di, scale, UPCAST, QUANT, QSCALE, BLOCK_H, BLOCK_D)
    lo, hi = _window(wlo_ptr, whi_ptr, t, WINDOW)
    s, pos = _score_tile(q, w, qs, k_ptr, stride_k, ks_ptr, stride_ks0, stride_ks1, table_ptr, stride_tb, seq, L,
                         q_pos, base, lo, hi, p0, num_pages, page_size, max_pages, Di, scale, CAUSAL, PAGED, UPCAST,
                         IEEE, QUANT, QSCALE, WINDOW, BLOCK_N, BLOCK_D)
    tl.store(out_ptr + t * stride_ot + pos, s, mask=pos < W)

@triton.jit
def _pack(s, pos):
    """int64 keys: higher score first, then lower position (python_ref.selection.pack_keys)."""
    s = tl.where(s != s, float("-inf"), s) + 0.0  # NaN counts as -inf; -0.0 becomes +0.0
    b = s.to(tl.int32, bitcast=True)
    k32 = b ^ ((b >> 31) & 0x7FFFFFFF)
    return k32.to(tl.int64) * 4294967296 + (4294967295 - pos)

@triton.jit
def _pair_network(s, p, LOG_N: tl.constexpr, LOG_FIRST: tl.constexpr, DESC: tl.constexpr):
    """Bitonic network on (score, position) pairs [2**LOG_N], the Ascend variant's tl.sort:
    triton-ascend lowers tl.sort to hivm vsort, which sorts f16/f32 values only, neither packed int64
    keys nor values with their positions.

    Order: higher score first, then lower position, the order of _pack (scores must already count NaN
    as -inf and -0.0 as +0.0). LOG_FIRST = 1 sorts any input; LOG_FIRST = LOG_N runs only the last
    merge phase, which sorts a bitonic input. DESC: best first. Each element meets its partner
    i ^ stride through tl.gather (a UB gather on Ascend; reshaping to [n, 2, stride] instead pads the
    stride-1 views' last dimension to 32 bytes there and took minutes to lower), so the loops are
    runtime loops over one [2**LOG_N] shape. Positions travel as float32 (tl.gather on Ascend takes
    float or int8 data): exact below 2**24 (selection.PAIR_MAX_SLOTS).
    """
    i = tl.arange(0, 1 << LOG_N)
    for lb in range(LOG_FIRST, LOG_N + 1):  # phase lb: sorted runs of 2**lb
        for st in range(lb):
            stride = 1 << (lb - 1 - st)
            partner = i ^ stride
            ps = tl.gather(s, partner, 0)
            pp = tl.gather(p, partner, 0)
            better = (s > ps) | ((s == ps) & (p < pp))
            # Runs of 2**lb alternate direction (two neighbours form a bitonic run of the next phase);
            # the last phase (2**lb == 2**LOG_N) runs in DESC's direction. The lower element of a pair
            # keeps the better one in a descending run, the upper element the worse one.
            desc = ((i & (1 << lb)) == 0) == DESC
            keep = better == (((i & stride) == 0) == desc)
            s = tl.where(keep, s, ps)
            p = tl.where(keep, p, pp)
    return s, p

@triton.jit
def _slot_scores(s, SUB: tl.constexpr, BS: tl.constexpr, MEAN: tl.constexpr):
    """A score tile's slot scores: the positions' own (BS == 1), or per NSA block of BS positions their
    max, or with MEAN the mean over the block's valid positions (as python_ref.block_scores)."""
    if BS > 1:
        s2 = tl.reshape(s, [SUB, BS])
        if MEAN:
            ok = s2 > float("-inf")
            cnt = tl.sum(ok.to(tl.float32), axis=1)
            tot = tl.sum(tl.where(ok, s2, 0.0), axis=1)
            s = tl.where(cnt > 0, tot / tl.maximum(cnt, 1.0), float("-inf"))
        else:
            s = tl.max(s2, axis=1)
    return s


@triton.jit
def _store_best(out_ptr, t, sp, k, j, best, pos, valid, SPLITS: tl.constexpr, K_PAD: tl.constexpr):
    """One program's result: with one split, token t's k positions (-1 where no valid candidate); with
    SPLITS > 1, split sp's packed top-K_PAD keys, which the host merges."""
    if SPLITS == 1:
        tl.store(out_ptr + t * k + j, tl.where(valid, pos, -1), mask=j < k)
    else:
        tl.store(out_ptr + (t * SPLITS + sp) * K_PAD + j, best)


@triton.jit
def _select_kernel(q_ptr, k_ptr, w_ptr, out_ptr, scratch_ptr, L_ptr, qpos_ptr, base_ptr, seq_ptr, table_ptr,
                   qs_ptr, ks_ptr, wlo_ptr, whi_ptr,
                   stride_qt, stride_qh, stride_k, stride_wt, stride_tb, stride_qst, stride_qsh,
                   stride_ks0, stride_ks1, W, k, Hi, Di, scale,
                   num_pages, page_size, max_pages, invalid_max, sentinel, span, t_start, CAUSAL: tl.constexpr,
                   PAGED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
                   QSCALE: tl.constexpr, WINDOW: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, BS: tl.constexpr,
                   MEAN: tl.constexpr, SPLITS: tl.constexpr, PAIRS: tl.constexpr, LOG_K: tl.constexpr):
    # Units: a "slot" is a position (BS == 1) or a block of BS positions (NSA block selection).
    # Program (t, sp) handles slots [sp * span, sp * span + span) of token t (span: a multiple of
    # K_PAD). With SPLITS > 1 it writes its packed top-K_PAD to out_ptr[t, sp, :] (int64) and the
    # host merges the splits with one torch.topk; a decode step (few tokens, 128K keys) then
    # fills the GPU instead of running one long program per token.
    t = t_start + tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    L = tl.minimum(tl.load(L_ptr + t), W)  # positions >= W are outside the score row
    q_pos = tl.load(qpos_ptr + t)
    if PAGED:
        seq = tl.load(seq_ptr + t)
        base = 0
    else:
        seq = 0
        base = tl.load(base_ptr + t)
    # Nothing past the sequence (or past the query, when causal) can score: stop there.
    end = L
    if CAUSAL:
        end = tl.minimum(end, q_pos + 1)
    lo, hi = _window(wlo_ptr, whi_ptr, t, WINDOW)
    if WINDOW:
        end = tl.minimum(end, hi)  # nothing at or past the window's end scores either
    end_slots = (end + BS - 1) // BS
    q, w, qs = _load_query(q_ptr, w_ptr, qs_ptr, t, stride_qt, stride_qh, stride_wt, stride_qst, stride_qsh, Hi,
                           Di, scale, UPCAST, QUANT, QSCALE, BLOCK_H, BLOCK_D)
    j = tl.arange(0, K_PAD)
    SUB: tl.constexpr = BLOCK_N // BS  # slots per score tile
    if PAIRS:  # the running top-K_PAD as (score, position) pairs; an empty slot ranks below all
        best_s = tl.zeros([K_PAD], dtype=tl.float32) + float("-inf")
        best_p = tl.zeros([K_PAD], dtype=tl.float32) + 16777216.0  # past every position (< 2**24)
    else:
        best = tl.zeros([K_PAD], dtype=tl.int64) + sentinel
    row = scratch_ptr + (t * SPLITS + sp) * K_PAD
    # Computed here, after q's loads: computing it before them costs 30 registers on sm_90 (176 vs 146).
    start = sp * span
    if WINDOW:
        # Skip to the window's first chunk. It stays on a K_PAD boundary (span is a multiple of K_PAD):
        # chunks never straddle two splits, so no position is merged twice.
        start = tl.maximum(start, (tl.maximum(lo, 0) // BS) // K_PAD * K_PAD)
    for c0 in range(start, tl.minimum(sp * span + span, end_slots), K_PAD):
        for sub in range(0, K_PAD, SUB):  # a loop, not unrolled: K_PAD/SUB is up to 64
            s, pos = _score_tile(q, w, qs, k_ptr, stride_k, ks_ptr, stride_ks0, stride_ks1, table_ptr, stride_tb,
                                 seq, L, q_pos, base, lo, hi, (c0 + sub) * BS, num_pages, page_size, max_pages, Di,
                                 scale, CAUSAL, PAGED, UPCAST, IEEE, QUANT, QSCALE, WINDOW, BLOCK_N, BLOCK_D)
            tl.store(row + sub + tl.arange(0, SUB), _slot_scores(s, SUB, BS, MEAN))
        tl.debug_barrier()  # the chunk's scores, written by every thread, are read back below
        if PAIRS:
            cs = tl.load(row + j)
            cs = tl.where(cs != cs, float("-inf"), cs) + 0.0  # as _pack: NaN is -inf, -0.0 is +0.0
            # exact: slots < 2**24 on this path; no [K_PAD] int64 vector (8 KiB more of Ascend's UB)
            cp = j.to(tl.float32) + c0
            tl.debug_barrier()  # before the next chunk overwrites the scratch row
            # A chunk's positions are above every position already kept, so an equal score cannot enter.
            if tl.max(cs, axis=0) > tl.min(best_s, axis=0):
                cs, cp = _pair_network(cs, cp, LOG_K, 1, False)  # ascending: best[i] vs chunk's i-th worst
                take = (best_s > cs) | ((best_s == cs) & (best_p < cp))
                # the better of each pair: the top K_PAD of both, as one bitonic sequence
                best_s = tl.where(take, best_s, cs)
                best_p = tl.where(take, best_p, cp)
                best_s, best_p = _pair_network(best_s, best_p, LOG_K, LOG_K, True)
        else:
            keys = _pack(tl.load(row + j), c0 + j.to(tl.int64))
            tl.debug_barrier()  # before the next chunk overwrites the scratch row
            if tl.max(keys, axis=0) > tl.min(best, axis=0):  # else nothing of this chunk enters the top-k
                srt = tl.sort(keys, descending=True)
                best = tl.sort(tl.maximum(best, tl.flip(srt, 0)), descending=True)
    if PAIRS:
        best = _pack(best_s, best_p.to(tl.int64))  # only stored with SPLITS > 1 (an empty slot: an invalid key)
        pos = best_p.to(tl.int32)
        valid = best_s > float("-inf")
    else:
        pos = (4294967295 - (best & 4294967295)).to(tl.int32)
        valid = best > invalid_max
    _store_best(out_ptr, t, sp, k, j, best, pos, valid, SPLITS, K_PAD)
