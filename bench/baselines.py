"""What the package is compared with, on the same inputs: the dense SDPA a user would write without
this package, and peer sparse kernels when they are importable.

Each baseline is a :class:`Impl` whose ``prepare(inputs)`` does the one-off, untimed conversions
(layouts a peer wants, the float32 copy of the cache on the CPU) and returns the timed callable, or
raises :class:`Unavailable` with the reason it cannot run here. The callable returns ``out`` (and
``lse`` when the implementation gives one), checked by the same gate as the backends.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .problems import Inputs


class Unavailable(Exception):
    """This implementation cannot run here (not installed, wrong device, unsupported shape)."""


class Impl:
    name: str = ""
    kind: str = "baseline"  # "backend", "baseline" or "peer"

    def prepare(self, inp: Inputs) -> Callable[[], object]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# The package's own backends
# ---------------------------------------------------------------------------------------------

class BackendImpl(Impl):
    kind = "backend"

    def __init__(self, name: str):
        self.name = name

    def prepare(self, inp: Inputs):
        import attention

        b = attention.get_backend(self.name)
        reasons = b.not_supported_reasons(attention.validate(**inp.kwargs))
        if reasons:
            raise Unavailable("; ".join(reasons))
        kwargs = dict(inp.kwargs, backend=self.name, return_lse=True)
        return lambda: attention.selective_attention(**kwargs)


# ---------------------------------------------------------------------------------------------
# Dense scaled_dot_product_attention with the equivalent boolean mask
# ---------------------------------------------------------------------------------------------

def dense_mask(inp: Inputs) -> torch.Tensor:
    """[B, G, Lq, L] bool: True where the position is a kept candidate (docs/spec.md section 1 rules)."""
    p = inp.problem
    B, Lq, L, bs = p.batch, p.q_per_seq, p.context, p.block_size
    idx = inp.indices.to(torch.int64)  # [T, G, K]
    dev = idx.device
    if bs > 1:
        idx = (idx[..., None] * bs + torch.arange(bs, device=dev)).flatten(-2)
        idx = torch.where(inp.indices.to(torch.int64).repeat_interleave(bs, -1) >= 0, idx, -1)
    keep = (idx >= 0) & (idx < L)
    if p.causal:
        q_pos = (L - Lq + torch.arange(p.T, device=dev) % Lq)[:, None, None]
        keep &= idx <= q_pos
    # Dropped candidates are scattered into a spare column L, sliced off afterwards.
    target = torch.where(keep, idx, L)
    mask = torch.zeros(p.T, p.G, L + 1, dtype=torch.bool, device=dev)
    mask.scatter_(-1, target, True)
    return mask[..., :L].view(B, Lq, p.G, L).transpose(1, 2)


_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
HAS_ENABLE_GQA = _TORCH_VERSION >= (2, 5)


def sdpa_mode(device_type: str, heads_per_kv: int) -> str:
    """How the dense baseline shares a kv head between query heads.

    "gqa": ``enable_gqa=True`` (torch >= 2.5) with a mask broadcast over heads, what the docs suggest;
    "expand": kv heads repeated to H, for older torch; "fold": the query heads of a kv head stacked
    along SDPA's query-length dimension. The CPU uses "fold": there ``enable_gqa`` materialises the
    cache once per query head (36 GiB at dsv32-decode) and fails to allocate.
    """
    if heads_per_kv == 1:
        return "mha"
    if device_type == "cpu":
        return "fold"
    return "gqa" if HAS_ENABLE_GQA else "expand"


class DenseSDPA(Impl):
    """``F.scaled_dot_product_attention`` over the whole context with the selection as a mask.

    Timed: building the mask from the indices + the SDPA call (what a user pays per step).
    Untimed, in the baseline's favour: the contiguous [B, Hkv, L, D] copy of the (paged) cache, and
    on the CPU its float32 upcast (bfloat16 matmul there runs ~400x slower, docs/traps.md).
    Query heads share kv heads as :func:`sdpa_mode` says.
    """

    name = "sdpa-dense"
    kind = "baseline"

    def prepare(self, inp: Inputs):
        p = inp.problem
        dev = inp.q.device
        cdt = torch.float32 if dev.type == "cpu" else p.torch_dtype
        B, Lq, L, hg = p.batch, p.q_per_seq, p.context, p.H // p.Hkv
        mode = sdpa_mode(dev.type, hg)
        q = inp.q.view(B, Lq, p.Hkv, hg, p.Dqk)
        k = inp.kv_log
        if p.Dr:
            q = torch.cat([q, inp.kwargs["q_rope"].view(B, Lq, p.Hkv, hg, p.Dr)], dim=-1)
            k = torch.cat([k, inp.kvr_log], dim=-1)
        k = k.transpose(1, 2).to(cdt).contiguous()  # [B, Hkv, L, D]
        v = k[..., :p.Dv] if p.latent else inp.v_log.transpose(1, 2).to(cdt).contiguous()
        scale = (p.Dqk + p.Dr) ** -0.5
        if mode == "fold":
            # rows ordered (head in group, token), so a per-token mask repeats per head
            q = q.permute(0, 2, 3, 1, 4).reshape(B, p.Hkv, hg * Lq, -1).to(cdt).contiguous()

            def run():
                m = dense_mask(inp)  # [B, G, Lq, L], G = 1 (shared) or Hkv
                m = m[:, :, None].expand(B, p.G, hg, Lq, L).reshape(B, p.G, hg * Lq, L)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)  # [B, Hkv, hg*Lq, Dv]
                return o.view(B, p.Hkv, hg, Lq, p.Dv).permute(0, 3, 1, 2, 4).reshape(p.T, p.H, p.Dv)

            return run
        q = q.reshape(B, Lq, p.H, -1).transpose(1, 2).to(cdt).contiguous()  # [B, H, Lq, D]
        if mode == "expand":
            k, v = k.repeat_interleave(hg, dim=1), v.repeat_interleave(hg, dim=1)
        extra = dict(enable_gqa=True) if mode == "gqa" else {}

        def run():
            m = dense_mask(inp)  # [B, G, Lq, L]
            if p.G > 1:
                m = m.repeat_interleave(hg, dim=1)  # per kv head -> per query head
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, **extra)
            return o.transpose(1, 2).reshape(p.T, p.H, p.Dv)

        return run


class DenseMatmul(Impl):
    """The same dense masked attention written as explicit matmul -> masked softmax -> matmul, with the
    query heads of a kv head folded into one matrix (one GEMM per kv head, not one per query head).

    A second, often stronger, dense baseline: CPU SDPA is slow for single-token decode with 576-wide
    heads. Same timing rules as sdpa-dense. Declines when the score matrix would pass 1 GiB.
    """

    name = "dense-matmul"
    kind = "baseline"

    def prepare(self, inp: Inputs):
        p = inp.problem
        dev = inp.q.device
        score_bytes = p.T * p.H * p.context * 4
        if score_bytes > (1 << 30):
            raise Unavailable(f"score matrix would be {score_bytes / 2**30:.1f} GiB")
        cdt = torch.float32 if dev.type == "cpu" else p.torch_dtype
        B, Lq, hg = p.batch, p.q_per_seq, p.H // p.Hkv
        q = inp.q.view(B, Lq, p.Hkv, hg, p.Dqk)
        k = inp.kv_log
        if p.Dr:
            q = torch.cat([q, inp.kwargs["q_rope"].view(B, Lq, p.Hkv, hg, p.Dr)], dim=-1)
            k = torch.cat([k, inp.kvr_log], dim=-1)
        scale = (p.Dqk + p.Dr) ** -0.5
        # [B, Hkv, hg*Lq, D]: rows ordered (head in group, token) so the mask broadcasts per head
        q = (q.permute(0, 2, 3, 1, 4).reshape(B, p.Hkv, hg * Lq, -1).to(cdt) * scale).contiguous()
        kt = k.permute(0, 2, 3, 1).to(cdt).contiguous()  # [B, Hkv, D, L]
        v = (k[..., :p.Dv] if p.latent else inp.v_log).transpose(1, 2).to(cdt).contiguous()

        def run():
            m = dense_mask(inp)  # [B, G, Lq, L]
            s = torch.matmul(q, kt).view(B, p.Hkv, hg, Lq, p.context)
            s = s.masked_fill(~m[:, :, None], float("-inf"))
            o = torch.matmul(torch.softmax(s, dim=-1).view(B, p.Hkv, hg * Lq, p.context), v)
            return o.view(B, p.Hkv, hg, Lq, p.Dv).permute(0, 3, 1, 2, 4).reshape(p.T, p.H, p.Dv)

        return run


# ---------------------------------------------------------------------------------------------
# Peers (only where importable; each is checked by the gate like everything else)
# ---------------------------------------------------------------------------------------------

def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything else
        raise Unavailable(f"{name} not importable ({type(e).__name__}: {str(e)[:80]})") from None


class FlashMLASparse(Impl):
    """DeepSeek FlashMLA's sparse MLA kernel ``flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v)``.

    It takes a flat [s_kv, h_kv, 576] bfloat16 cache and indices into it (-1 = invalid), so the paged
    table is folded into the indices before timing, as DeepSeek's inference code does.
    """

    name = "flashmla-sparse"
    kind = "peer"

    def prepare(self, inp: Inputs):
        p = inp.problem
        if inp.q.device.type != "cuda":
            raise Unavailable("needs a CUDA device")
        mod = _import("flash_mla")
        fn = getattr(mod, "flash_mla_sparse_fwd", None)
        if fn is None:
            raise Unavailable("flash_mla has no flash_mla_sparse_fwd (older FlashMLA)")
        if not p.latent or p.Dr or p.block_size != 1 or p.dtype != "bfloat16":
            raise Unavailable("only latent MLA, token selection, bfloat16")
        kv = inp.kwargs["kv"]
        idx = inp.indices.to(torch.int64)
        if p.page_size:
            flat = kv.reshape(-1, p.Hkv, p.Dqk)
            table = inp.kwargs["block_table"].to(torch.int64)
            seq = torch.arange(p.T, device=idx.device) // p.q_per_seq
            page = table[seq][:, None, :].expand(-1, idx.shape[1], -1).gather(-1, (idx.clamp(min=0) // p.page_size))
            rows = page * p.page_size + idx.clamp(min=0) % p.page_size
        else:
            flat = kv
            rows = idx + (torch.arange(p.T, device=idx.device) // p.q_per_seq * p.context)[:, None, None]
        rows = torch.where(idx >= 0, rows, -1).to(torch.int32)
        if rows.shape[1] != p.Hkv:
            rows = rows.expand(-1, p.Hkv, -1)
        rows = rows.contiguous()
        scale = p.Dqk ** -0.5
        q = inp.q.contiguous()
        # Only out is compared: FlashMLA's lse convention is its own.
        return lambda: fn(q, flat, rows, scale, p.Dv)[0]


class FlaParallelNSA(Impl):
    """flash-linear-attention's ``parallel_nsa`` selected-block branch (g_slc = 1, no window).

    Block selection only (``block_size`` > 1, per kv head), causal, contiguous [B, T, H, D] inputs
    with as many queries as keys (fla's prefill layout).
    """

    name = "fla-parallel_nsa"
    kind = "peer"

    def prepare(self, inp: Inputs):
        p = inp.problem
        if inp.q.device.type != "cuda":
            raise Unavailable("needs a CUDA device")
        if p.block_size == 1 or p.latent or p.Dr or not p.causal or p.q_per_seq != p.context:
            raise Unavailable("only causal block selection with separate v, queries = keys")
        mod = _import("fla.ops.nsa")
        fn = getattr(mod, "parallel_nsa", None)
        if fn is None:
            raise Unavailable("fla.ops.nsa has no parallel_nsa")
        B, L = p.batch, p.context
        q = inp.q.view(B, L, p.H, p.Dqk).contiguous()
        k = inp.kv_log.contiguous()
        v = inp.v_log.contiguous()
        idx = inp.indices.to(torch.int64).view(B, L, p.G, p.K)
        if p.G != p.Hkv:
            idx = idx.expand(-1, -1, p.Hkv, -1)
        # fla reads the first block_counts entries: sort valid blocks first (-1 padding last).
        counts = (idx >= 0).sum(-1)
        idx = torch.sort(torch.where(idx >= 0, idx, torch.iinfo(torch.int64).max), dim=-1).values
        idx = torch.where(idx == torch.iinfo(torch.int64).max, 0, idx).contiguous()
        g_slc = torch.ones(B, L, p.H, device=q.device, dtype=q.dtype)
        g_swa = torch.zeros(B, L, p.H, device=q.device, dtype=q.dtype)
        kw = dict(q=q, k=k, v=v, g_slc=g_slc, g_swa=g_swa, block_indices=idx, block_counts=counts,
                  block_size=p.block_size, scale=p.Dqk ** -0.5)
        params = inspect.signature(fn).parameters
        kw = {k_: v_ for k_, v_ in kw.items() if k_ in params}
        if "window_size" in params:
            kw["window_size"] = 0
        return lambda: fn(**kw).reshape(p.T, p.H, p.Dv)


class TorchNPUSparseFlashAttention(Impl):
    """torch_npu's sparse flash attention on an Ascend NPU (``npu_sparse_flash_attention``)."""

    name = "torch_npu-sfa"
    kind = "peer"

    def prepare(self, inp: Inputs):
        p = inp.problem
        if inp.q.device.type != "npu":
            raise Unavailable("needs an Ascend NPU")
        mod = _import("torch_npu")
        fn = getattr(mod, "npu_sparse_flash_attention", None)
        if fn is None:
            raise Unavailable("torch_npu has no npu_sparse_flash_attention (CANN/torch_npu too old)")
        if not p.latent or not p.page_size or p.block_size != 1 or p.Hkv != 1 or (p.Dqk, p.Dv) != (576, 512):
            raise Unavailable("only DeepSeek MLA (576 = 512 + 64 rope, one kv head), paged, token selection")
        # Layout per the torch_npu documentation for DeepSeek-V3.2 (TND query, PA_BSND cache);
        # the gate below rejects the row if this reading of the API is wrong.
        q = inp.q[..., :p.Dv].contiguous()
        q_rope = inp.q[..., p.Dv:].contiguous()
        kv = inp.kwargs["kv"]
        key = kv[..., :p.Dv].contiguous()
        key_rope = kv[..., p.Dv:].contiguous()
        idx = inp.indices.expand(-1, p.Hkv, -1).contiguous()
        cu_q = (torch.arange(p.batch + 1, device=q.device, dtype=torch.int32) * p.q_per_seq)[1:]
        kw = dict(query=q, key=key, value=key, sparse_indices=idx, scale_value=(p.Dqk) ** -0.5,
                  block_table=inp.kwargs["block_table"], actual_seq_lengths_query=cu_q,
                  actual_seq_lengths_kv=inp.kwargs["seqlens_k"], query_rope=q_rope, key_rope=key_rope,
                  sparse_block_size=1, layout_query="TND", layout_kv="PA_BSND", sparse_mode=3,
                  attention_mode=2)  # MLA-absorb: 512 latent + 64 rope, one kv head
        return lambda: fn(**kw)


def all_baselines() -> List[Impl]:
    return [DenseSDPA(), DenseMatmul(), FlashMLASparse(), FlaParallelNSA(), TorchNPUSparseFlashAttention()]


def split_result(res) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, lse or None) from whatever an implementation returned."""
    if isinstance(res, torch.Tensor):
        return res, None
    res = tuple(res)
    out = res[0]
    lse = res[1] if len(res) > 1 and isinstance(res[1], torch.Tensor) else None
    return out, lse
