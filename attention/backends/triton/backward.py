"""Host side of the Triton backward: allocate, launch, reduce d attn_sink. Never reads device data.

Atomics mode (default): ``selective_attention_bwd_kernel`` writes dq/dq_rope and adds every
candidate's key/value gradient into float32 copies of the caches with ``tl.atomic_add``; the order
of those adds, and so the last bits, varies from run to run on a GPU.

Deterministic mode (``ATTENTION_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``):
the same kernel writes dq/dq_rope and, instead of adding, the flat cache row of each candidate
(-1 when dropped) into a [T, G, K * block_size] int64 buffer; a stable sort by row groups the
candidates of each row, and ``selective_attention_bwd_dkv_kernel`` reduces each row in that order.
Extra memory: that index buffer, its sort and [G, rows + 1] segment offsets; never a [T, K, D] buffer.

d attn_sink = -sum_t rowsum(dO * out) * sigmoid(sink - lse) is a [T, H] reduction done with torch
(fixed order, deterministic), from the delta the kernels read anyway.
"""

from __future__ import annotations

import os
from typing import List

import torch

from ...arguments import ARG_NAMES, ARGS, DIFFERENTIABLE
from ...inputs import SelectiveAttentionInputs, new_empty, next_power_of_2
# The kernels are looked up on their module at each launch (tests spy on them there).
from . import backward_kernels
from .launch import named_strides, padded_strides

_p2 = next_power_of_2

# Whole-width tiles (dq stays in registers across candidate tiles, see backward_kernels): the key
# (latent: value) part up to 512 columns, a latent row's tail and the split rope part up to 256.
MAX_KEY_TILE = 512
MAX_TAIL_TILE = 256
DETERMINISTIC_ENV = "ATTENTION_DETERMINISTIC"


def deterministic() -> bool:
    """Identical bits on repeat: asked for by the environment or by torch's global switch."""
    return (os.environ.get(DETERMINISTIC_ENV, "0") not in ("", "0", "false", "False")
            or torch.are_deterministic_algorithms_enabled())


def limit_reasons(inp) -> List[str]:
    """Inputs the backward kernel does not handle (the registry then runs the reference's backward)."""
    out = []
    key_width = inp.d_v if inp.v is None else inp.head_dim
    if _p2(key_width) > MAX_KEY_TILE:
        out.append(f"backward: key tile {key_width} columns > {MAX_KEY_TILE}")
    if inp.v is not None and _p2(inp.d_v) > MAX_KEY_TILE:
        out.append(f"backward: value width {inp.d_v} > {MAX_KEY_TILE}")
    if inp.v is None and _p2(inp.head_dim - inp.d_v) > MAX_TAIL_TILE:
        out.append(f"backward: latent key tail {inp.head_dim - inp.d_v} columns > {MAX_TAIL_TILE}")
    if _p2(inp.rope_dim) > MAX_TAIL_TILE:
        out.append(f"backward: rope width {inp.rope_dim} > {MAX_TAIL_TILE}")
    return out


def plan(inp) -> dict:
    """Block sizes of the backward (power-of-two, >= 16 for tl.dot)."""
    hg = inp.num_heads // inp.num_kv_heads
    latent = inp.v is None
    dk = inp.d_v if latent else inp.head_dim
    bdk = max(16, _p2(dk))
    # 32 heads x 512 float32 accumulator columns is the widest dq a program keeps on chip.
    bh = max(16, min(_p2(hg), 32 if bdk <= 256 else 16))
    # Warps and BLOCK_N from sm_90 compiles of both kernels (docs/triton.md "Backward"; never run on a
    # GPU): 16 candidates x 8 warps is the least spilling for 512-wide latent rows, and spill-free
    # (175 registers) at NSA's 128 widths; the dkv kernel spills at 512 columns below 16 warps.
    return dict(DK=dk, HAS_TAIL=latent and inp.head_dim > inp.d_v, BLOCK_H=bh, NUM_HB=-(-hg // bh),
                num_warps=8, dkv_num_warps=16 if bdk >= 256 else 4, BLOCK_N=16, BLOCK_DK=bdk,
                BLOCK_DV=bdk if latent else max(16, _p2(inp.d_v)),
                BLOCK_DT=max(16, _p2(inp.head_dim - inp.d_v)) if latent and inp.head_dim > inp.d_v else 16,
                BLOCK_DR=max(16, _p2(inp.rope_dim)) if inp.rope_dim else 16)


def _sink_gradient(inp, lse, delta):
    """d attn_sink = -sum_t delta * sigmoid(sink - lse) (zero without dO; None without a sink)."""
    if inp.attn_sink is None:
        return None
    if delta is None:
        return torch.zeros_like(inp.attn_sink)
    share = torch.sigmoid(inp.attn_sink.float()[None, :] - lse)  # exp(sink) / (exp(lse) + exp(sink))
    return (-(delta * share).sum(0)).to(inp.attn_sink.dtype)


def _shared_args(inp, p: dict, lse, delta, grad_out, grad_lse, gk, gv, gkr) -> dict:
    """The arguments both backward kernels take, by their parameter names (absent tensors replaced
    by gk, never read)."""
    q, kv, v, paged = inp.q, inp.kv, inp.v, inp.paged
    sink = None if inp.attn_sink is None else inp.attn_sink.contiguous().float()
    opt = lambda x: gk if x is None else x  # noqa: E731
    return dict(
        Q=q, KV=kv, V=opt(v), QR=opt(inp.q_rope), KVR=opt(inp.kv_rope), SINK=opt(sink), LSE=lse,
        DELTA=opt(delta), DO=opt(grad_out), DLSE=opt(grad_lse), GK=gk, GV=opt(gv), GKR=opt(gkr),
        sm_scale=float(inp.sm_scale), n_cand=inp.topk * inp.block_size,
        **named_strides("stride_q", "thd", q.stride()),
        **named_strides("stride_k", "prhd", padded_strides(kv, paged, 4)),
        **named_strides("stride_v", "prhd", padded_strides(v, paged, 4)),
        **named_strides("stride_qr", "thd", padded_strides(inp.q_rope, paged, 3)),
        **named_strides("stride_kr", "prhd", padded_strides(inp.kv_rope, paged, 4)),
        **named_strides("stride_l", "th", lse.stride()),
        **named_strides("stride_d", "th", padded_strides(delta, paged, 2)),
        **named_strides("stride_do", "thd", padded_strides(grad_out, paged, 3)),
        **named_strides("stride_dl", "th", padded_strides(grad_lse, paged, 2)),
        **named_strides("stride_gk", "prhd", padded_strides(gk, paged, 4)),
        **named_strides("stride_gv", "prhd", padded_strides(gv, paged, 4)),
        **named_strides("stride_gkr", "prhd", padded_strides(gkr, paged, 4)),
        HG=inp.num_heads // inp.num_kv_heads, DQK=inp.head_dim, DK=p["DK"], DV=inp.d_v, DR=inp.rope_dim,
        LATENT=v is None, HAS_TAIL=p["HAS_TAIL"], PAGE_SIZE=inp.page_size if paged else 1,
        HAS_SINK=sink is not None, HAS_DO=grad_out is not None, HAS_DLSE=grad_lse is not None,
        NUM_HB=p["NUM_HB"], BLOCK_H=p["BLOCK_H"], BLOCK_DK=p["BLOCK_DK"], BLOCK_DT=p["BLOCK_DT"],
        BLOCK_DR=p["BLOCK_DR"], BLOCK_DV=p["BLOCK_DV"],
    )


def _launch_token_kernel(inp, p: dict, common: dict, dq, dqr, det: bool):
    """selective_attention_bwd_kernel: dq, dq_rope, and the cache gradients by atomics, or (det) each
    candidate's flat cache row, returned as [T, G, n] int64 (None with atomics)."""
    idx, kv, bt, paged = inp.indices, inp.kv, inp.block_table, inp.paged
    T, G, B = inp.num_tokens, idx.shape[1], inp.num_seqs
    gk = common["GK"]
    rows = torch.empty((T, G, inp.topk * inp.block_size), device=kv.device, dtype=torch.int64) if det else None
    opt = lambda x: gk if x is None else x  # noqa: E731
    cuq, cuk, seqk = (None if x is None else x.contiguous()
                      for x in (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.seqlens_k))
    backward_kernels.selective_attention_bwd_kernel[(T, inp.num_kv_heads * p["NUM_HB"])](
        **common, IDX=idx, BT=opt(bt), CUQ=opt(cuq), CUK=opt(cuk), SEQK=opt(seqk), DQ=dq, DQR=opt(dqr),
        ROWS=opt(rows), T=T, B=B, S_total=0 if paged else kv.shape[0], num_pages=kv.shape[0] if paged else 0,
        max_pages=bt.shape[1] if bt is not None else 0,
        stride_it=idx.stride(0), stride_ig=0 if G == 1 else idx.stride(1), stride_ik=idx.stride(2),
        **named_strides("stride_bt", "bp", bt.stride() if bt is not None else (0, 0)),
        **named_strides("stride_dq", "thd", dq.stride()),
        **named_strides("stride_dqr", "thd", padded_strides(dqr, paged, 3)),
        stride_rt=rows.stride(0) if det else 0, stride_rg=rows.stride(1) if det and G > 1 else 0,
        VARLEN=inp.cu_seqlens_q is not None, HAS_CUK=inp.cu_seqlens_k is not None, PAGED=paged,
        BLOCK_SIZE=inp.block_size, CAUSAL=inp.causal, ATOMIC=not det, WRITE_ROWS=det,
        SEARCH_STEPS=max(1, B.bit_length() + 1), F32_DOT=kv.device.type == "cpu" or inp.dtype == torch.float32,
        BLOCK_N=p["BLOCK_N"], num_warps=p["num_warps"],
    )
    return rows


def _launch_row_kernel(inp, p: dict, common: dict, rows) -> None:
    """selective_attention_bwd_dkv_kernel (deterministic mode): each cache row sums the candidates that
    name it, in token order."""
    kv, paged = inp.kv, inp.paged
    G, n = rows.shape[1], rows.shape[2]
    n_rows = kv.shape[0] * (kv.shape[1] if paged else 1)
    if n == 0 or n_rows == 0:
        return
    # Candidates grouped by the row they name: stable sort (ties keep token order), then the
    # stretch of each row by binary search. Dropped candidates (-1) sort first, outside every stretch.
    flat = rows.permute(1, 0, 2).reshape(G, -1)
    sorted_rows, perm = torch.sort(flat, dim=-1, stable=True)
    bounds = torch.arange(n_rows + 1, device=kv.device, dtype=torch.int64).expand(G, n_rows + 1).contiguous()
    seg = torch.searchsorted(sorted_rows, bounds)
    backward_kernels.selective_attention_bwd_dkv_kernel[(n_rows, inp.num_kv_heads)](
        **common, PERM=perm, SEG=seg, n_rows=n_rows, stride_pg=perm.stride(0) if G > 1 else 0,
        stride_sg=seg.stride(0) if G > 1 else 0, PAGED=paged, num_warps=p["dkv_num_warps"],
    )


def backward(inp, out, lse, grad_out, grad_lse, *, deterministic_mode=None):
    """Gradients (dq, dkv, dv, dq_rope, dkv_rope, dattn_sink) in ``DIFFERENTIABLE`` order."""
    det = deterministic() if deterministic_mode is None else deterministic_mode
    q, kv, v = inp.q, inp.kv, inp.v
    dev = q.device
    p = plan(inp)
    # dq / dq_rope: every element is written by the kernel (NaN-filled under tests to prove it).
    dq = new_empty(*q.shape, device=dev, dtype=q.dtype)
    dqr = None if inp.q_rope is None else new_empty(*inp.q_rope.shape, device=dev, dtype=inp.q_rope.dtype)
    # Cache gradients accumulate in float32 from zero: rows no candidate names stay exactly 0.
    gk = torch.zeros(kv.shape, device=dev, dtype=torch.float32)
    gv = None if v is None else torch.zeros(v.shape, device=dev, dtype=torch.float32)
    gkr = None if inp.kv_rope is None else torch.zeros(inp.kv_rope.shape, device=dev, dtype=torch.float32)
    # delta = rowsum(dO * out): FlashAttention's preprocessing, here one fused torch reduction.
    delta = None if grad_out is None else (grad_out.float() * out.float()).sum(-1)
    dsink = _sink_gradient(inp, lse, delta)
    if inp.num_tokens > 0:
        common = _shared_args(inp, p, lse, delta, grad_out, grad_lse, gk, gv, gkr)
        rows = _launch_token_kernel(inp, p, common, dq, dqr, det)
        if det:
            _launch_row_kernel(inp, p, common, rows)
    return (dq, gk.to(kv.dtype), None if gv is None else gv.to(v.dtype), dqr,
            None if gkr is None else gkr.to(inp.kv_rope.dtype), dsink)


# ---------------------------------------------------------------- the launcher as an op
# torch.compile traces the attention op's backward (AOTAutograd) with fake tensors, which a Triton
# launch cannot take: the launcher is an op of its own with a fake kernel, so a compiled training
# step keeps the Triton backward in its graph. Its arguments are the forward's (the ARGS table,
# already validated: d_v and sm_scale filled in) after the saved and incoming tensors; absent
# gradients come back as empty tensors (an op's outputs cannot be None).
_lib = torch.library.Library("attention", "FRAGMENT")
_lib.define("triton_selective_attention_backward(Tensor out, Tensor lse, Tensor? grad_out, Tensor? grad_lse, "
            "bool deterministic, " + ", ".join(a.schema() for a in ARGS) + ") -> (Tensor, Tensor, Tensor, Tensor, "
            "Tensor, Tensor)")


def _inputs(args):
    return SelectiveAttentionInputs(**dict(zip(ARG_NAMES, args)))


def _present(grads, like):
    return tuple(torch.empty(0, device=like.device) if g is None else g for g in grads)


def _op_impl(out, lse, grad_out, grad_lse, det, *args):
    return _present(backward(_inputs(args), out, lse, grad_out, grad_lse, deterministic_mode=det), out)


def _op_fake(out, lse, grad_out, grad_lse, det, *args):
    inp = _inputs(args)
    grads = tuple(None if getattr(inp, n) is None else torch.empty_like(getattr(inp, n)) for n in DIFFERENTIABLE)
    return _present(grads, out)


_lib.impl("triton_selective_attention_backward", _op_impl, "CompositeExplicitAutograd")
torch.library.register_fake("attention::triton_selective_attention_backward", _op_fake, lib=_lib)


def backward_op(inp, out, lse, grad_out, grad_lse):
    """The Triton backward through its op (what ``TritonBackend.backward`` calls)."""
    grads = torch.ops.attention.triton_selective_attention_backward(
        out, lse, grad_out, grad_lse, deterministic(), *(getattr(inp, n) for n in ARG_NAMES))
    return tuple(None if getattr(inp, n) is None else g for n, g in zip(DIFFERENTIABLE, grads))
