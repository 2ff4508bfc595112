"""Triton kernels for selection (docs/spec.md section 2): the lightning-indexer scores and the fused select.

Layout: one program per query token. The indexer heads are the M dimension of the tile
(``[Hi, Di] x [Di, BLOCK_N]``, DeepSeek-V3.2 has Hi = 64), so a program never mixes sequences and
varlen/paged inputs need no host-side tile schedule: the per-token sequence facts (length, causal
position, first row or block-table row) come from ``python_ref.token_metadata`` on the device,
without a sync. Positions are masked before any load, so a garbage row (NaN in an unused page) or a
-1 table entry is never read.

Fused select: the program streams over the keys in chunks of ``K_PAD`` positions (k rounded up to a
power of two). Each chunk's scores are computed ``BLOCK_N`` at a time on chip and parked in a
per-token scratch row of ``K_PAD`` floats (L1/L2 resident; memory O(T * k), never O(T * W)), then
packed into int64 keys (score order-preserving bits << 32 | ~position, exactly
python_ref.selection.pack_keys), sorted, and merged with the running top-``K_PAD`` by the bitonic
trick ``max(best, flip(chunk_sorted))`` followed by one more sort. A chunk whose best key cannot
enter the running top-k is skipped without sorting. Packed keys are unique, so the result is exact
and equal to the reference bit for bit, ties included.

Dots: float32 inputs use ``input_precision="ieee"`` (TF32 would reorder near-equal scores against
the reference); float16/bfloat16 use their native tensor-core dot on the GPU and are upcast under
``TRITON_INTERPRET=1`` because the interpreter's bfloat16 ``tl.dot`` is wrong (docs/traps.md).

Serving engines' inputs: float8_e4m3fn / int8 ``q_idx`` and ``k_idx`` enter the dot as
stored (bfloat16 on the GPU, exact for both formats; float32 under the interpreter) and their float32
per-row scales multiply the logits before the relu (selection_kernels._score_tile); per-token key
windows ``[cu_seqlen_ks, cu_seqlen_ke)`` mask positions, and select starts at the window's first chunk.

Block selection (``block_size = b > 1``, b a power of two <= 128): each score tile holds whole
blocks and is reduced to block scores ("max" or "mean" over valid positions) before it is parked.
Not implemented here (the registry falls back to the reference, which runs on the GPU with torch
ops): other block sizes, and k > 4096. ``topk_indices`` on CUDA is the CUDA C++
kernel (attention/backends/cuda/__init__.py).
"""

from __future__ import annotations

from typing import List

import torch

import python_ref
from python_ref.selection import INVALID_KEY_MAX, best_positions, score_width

from ...inputs import new_empty, next_power_of_2
from .backend import interpreting


def _kernels():
    # triton itself is imported only when a kernel first runs: see selection_kernels.py.
    from . import selection_kernels

    return selection_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


MAX_K = 4096
# On Ascend the pair network's [K_PAD] vectors sit in the 192 KiB UB beside the score tile: k = 2048
# plans 182 KiB, k = 4096 264 KiB (make triton-ascend-check, docs/triton.md "Ascend").
MAX_K_NPU = 2048
MAX_BLOCK = 128  # block selection: power-of-two blocks up to this size
_SENTINEL = -(1 << 63)  # smaller than every packed key: an empty slot of the running top-k
# The pair network (selection_kernels._pair_network) carries positions as float32: exact below 2**24.
PAIR_MAX_SLOTS = 1 << 24


def limit_reasons(inp) -> List[str]:
    """What the kernels cannot do (the registry then chooses another backend)."""
    reasons = []
    # float8 on npu is declined by the backend (backend.NPU_DECLINED: A2/A3 have no FP8 type); the int8
    # indexer compiles for Ascend (make triton-ascend-check), the int8 select does not fit its UB.
    if inp.op == "select":
        if inp.device.type == "npu" and inp.quantized:
            reasons.append("quantized select on npu: its int8 score tile beside the pair network plans 209.6 KiB of the "
                           "192 KiB UB (190.2 KiB with 16-position tiles, over the 184 KB the Ascend records keep)")
        b = inp.block_size
        if b & (b - 1) or b > MAX_BLOCK:
            reasons.append(f"block_size={b}: triton needs a power of two <= {MAX_BLOCK}")
        if inp.k > MAX_K:
            reasons.append(f"k={inp.k} > {MAX_K}")
        elif inp.device.type == "npu" and inp.k > MAX_K_NPU:
            reasons.append(f"k={inp.k} > {MAX_K_NPU} on npu (the pair network's [k] vectors overflow the UB)")
    return reasons


def _max_slots(inp) -> int:
    """Slots (positions, or blocks of them) a valid candidate can have, from shapes alone: a paged
    sequence lives in its table's pages, a contiguous one inside k_idx. (Checked at launch, not in
    limit_reasons: the registry caches its choice on sizes that leave the cache's length out.)"""
    kx = inp.k_idx
    width = inp.block_table.shape[1] * kx.shape[1] if kx.dim() == 3 else kx.shape[0]
    return -(-width // inp.block_size)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, next_power_of_2(n))


def _new(*shape, device, dtype):
    return new_empty(*shape, device=device, dtype=dtype)


class TritonSelection:
    """Launches of the selection kernels; the ``triton`` backend (backend.py) declares and calls them."""

    # ---- launch ----
    def _common(self, inp):
        q, kx, w = inp.q_idx, inp.k_idx, inp.weights
        T, Hi, Di = q.shape
        if q.stride(2) != 1:
            q = q.contiguous()
        if kx.stride(-1) != 1 or (kx.dim() == 3 and kx.stride(0) != kx.shape[1] * kx.stride(1)):
            kx = kx.contiguous()
        paged = kx.dim() == 3
        k_flat = kx.reshape(-1, Di) if paged else kx
        # The kernels read weights rows as dense vectors of Hi (stride 1): copy a strided/expanded view.
        w = w.to(torch.float32).contiguous()
        seq, L, q_pos, base = python_ref.token_metadata(T, None if paged else kx.shape[0], q.device,
                                                        inp.cu_seqlens_q, inp.cu_seqlens_k,
                                                        inp.seqlens_k if paged else None)
        table = inp.block_table.to(torch.int32).contiguous() if paged else L  # dummy pointer when contiguous
        W = score_width(kx, inp.cu_seqlens_k, inp.seqlens_k if paged else None, inp.max_seqlen_k)
        # Quantized inputs take the low-precision road on a GPU: their stored values are exact in
        # bfloat16, so the tensor-core bfloat16 dot gives the products exactly (float32 accumulation).
        quant = inp.quantized
        lowp = q.dtype in (torch.float16, torch.bfloat16) or quant
        meta = dict(CAUSAL=inp.causal, PAGED=paged, UPCAST=interpreting() or not lowp,
                    IEEE=not lowp or interpreting(), QUANT=quant, QSCALE=inp.q_idx_scale is not None,
                    WINDOW=inp.cu_seqlen_ks is not None, BLOCK_H=_p2(Hi), BLOCK_D=_p2(Di))
        # Absent optional tensors are passed as a dummy pointer (L): their constexpr flag is off.
        qs = L if inp.q_idx_scale is None else inp.q_idx_scale
        ks = L if inp.k_idx_scale is None else inp.k_idx_scale  # strided views are read as they are
        wlo, whi = (L, L) if inp.cu_seqlen_ks is None else (inp.cu_seqlen_ks, inp.cu_seqlen_ke)
        args = dict(q=q, k=k_flat, w=w, L=L, q_pos=q_pos, base=L if base is None else base, seq=seq, table=table,
                    T=T, Hi=Hi, Di=Di, W=W, scale=float(Di ** -0.5 if inp.scale is None else inp.scale),
                    num_pages=kx.shape[0] if paged else 0, page_size=kx.shape[1] if paged else 1,
                    max_pages=table.shape[1] if paged else 1, stride_tb=table.stride(0) if paged else 0,
                    qs=qs, ks=ks, wlo=wlo, whi=whi,
                    strides=(qs.stride(0) if qs.dim() == 2 else 0, qs.stride(1) if qs.dim() == 2 else 0,
                             ks.stride(0) if inp.k_idx_scale is not None else 0,
                             ks.stride(1) if inp.k_idx_scale is not None and paged else 0))
        return args, meta

    def run(self, inp):
        from .launch import token_chunks

        a, meta = self._common(inp)
        T, W = a["T"], a["W"]
        if inp.op == "lightning_indexer":
            out = _new(T, W, device=a["q"].device, dtype=torch.float32)
            if T == 0 or W == 0:
                return out
            BLOCK_N = 64
            for t_start, tokens in token_chunks(T, _cdiv(W, BLOCK_N), a["q"].device):
                _kernels()._indexer_kernel[(tokens, _cdiv(W, BLOCK_N))](
                    a["q"], a["k"], a["w"], out, a["L"], a["q_pos"], a["base"], a["seq"], a["table"],
                    a["qs"], a["ks"], a["wlo"], a["whi"],
                    a["q"].stride(0), a["q"].stride(1), a["k"].stride(0), a["w"].stride(0), out.stride(0),
                    a["stride_tb"], *a["strides"], W, a["Hi"], a["Di"], a["scale"], a["num_pages"], a["page_size"],
                    a["max_pages"], t_start, BLOCK_N=BLOCK_N, **meta)
            return out
        k = inp.k
        dev = self.device_config(a["q"].device)
        pairs = self.pair_sort(a["q"].device, dev)
        if pairs and _max_slots(inp) > PAIR_MAX_SLOTS:  # from shapes: no sync, before any kernel
            raise ValueError(f"k_idx: {_max_slots(inp)} key slots per sequence > {PAIR_MAX_SLOTS}, the most the "
                             f"Triton select takes on {a['q'].device.type} (its pair network's positions are "
                             "float32); pass block_size > 1 or use another backend")
        out = _new(T, 1, k, device=a["q"].device, dtype=torch.int32)
        if T == 0 or k == 0:
            return out
        K_PAD = _p2(k)
        bs = inp.block_size
        # positions per score tile: whole blocks (Ascend's records take 32: with 64 the tile and the
        # pair network's [K_PAD] vectors plan 193 KiB of the 192 KiB UB at k = 2048)
        BLOCK_N = max(min(K_PAD * bs, int(dev.get("SELECT_BLOCK_N", 64))), bs)
        slots = -(-W // bs)
        chunks = max(1, -(-slots // K_PAD))
        splits = self.num_splits(T, chunks, a["q"].device)
        span = -(-chunks // splits) * K_PAD
        splits = max(1, -(-slots // span))  # no empty split
        scratch = torch.empty(T, splits, K_PAD, device=a["q"].device, dtype=torch.float32)
        dst = out if splits == 1 else torch.empty(T, splits, K_PAD, device=a["q"].device, dtype=torch.int64)
        for t_start, tokens in token_chunks(T, splits, a["q"].device):
            _kernels()._select_kernel[(tokens, splits)](
                a["q"], a["k"], a["w"], dst, scratch, a["L"], a["q_pos"], a["base"], a["seq"], a["table"],
                a["qs"], a["ks"], a["wlo"], a["whi"],
                a["q"].stride(0), a["q"].stride(1), a["k"].stride(0), a["w"].stride(0), a["stride_tb"],
                *a["strides"], W, k, a["Hi"], a["Di"], a["scale"], a["num_pages"], a["page_size"], a["max_pages"],
                INVALID_KEY_MAX, _SENTINEL, span, t_start, BLOCK_N=BLOCK_N, K_PAD=K_PAD, BS=bs,
                MEAN=inp.block_reduce == "mean", SPLITS=splits, PAIRS=pairs,
                LOG_K=K_PAD.bit_length() - 1, num_warps=8 if K_PAD >= 1024 else 4, **meta)
        if splits > 1:
            # Packed keys are unique and ordered, so one int64 top-k merges the splits exactly.
            return best_positions(dst.view(T, splits * K_PAD), k)
        return out

    #: tests set this to force a split count (the interpreter has no SMs to fill)
    splits_override = None
    #: tests set this to force the merge variant (True: the Ascend pair network) on any device
    pair_sort_override = None

    @staticmethod
    def device_config(device) -> dict:
        """The shipped record's config of the device planned for (ATTENTION_TRITON_TARGET or the
        tensors' device): the selection kernels' fields SELECT_*. Not the user's tuning store, whose
        entries tune the attention kernels."""
        from ... import tuning
        from .launch import device_name

        rec = tuning.shipped_entry("triton", device_name(device))
        return dict((rec or {}).get("config") or {})

    def pair_sort(self, device, config=None) -> bool:
        """Merge the running top-k as (score, position) pairs with our own bitonic network instead of
        tl.sort of packed int64 keys: always on npu (triton-ascend lowers tl.sort to hivm vsort, f16/f32
        only), and where the shipped record of the device planned for says ``SELECT_PAIR_SORT`` (the
        Ascend SoCs' records, for ATTENTION_TRITON_TARGET planning); NVIDIA keeps tl.sort."""
        if self.pair_sort_override is not None:
            return bool(self.pair_sort_override)
        if device.type == "npu":
            return True
        return bool((self.device_config(device) if config is None else config).get("SELECT_PAIR_SORT", 0))

    def num_splits(self, T: int, chunks: int, device) -> int:
        """Key-range splits per token: enough programs for ~2 waves over the SMs, each at least 2 chunks."""
        if self.splits_override is not None:
            return max(1, min(int(self.splits_override), chunks))
        if device.type == "npu":  # AI cores (launch.SM_COUNTS); an Ascend part it does not know: none
            from .launch import sm_count

            sms = sm_count(device)
            if not sms:
                return 1
        elif device.type != "cuda":
            return 1
        else:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(-(-2 * sms // max(T, 1)), chunks // 2))


LAUNCHER = TritonSelection()
