"""Hugging Face transformers drop-in for DeepSeek-V3.2 (``DeepseekV32ForCausalLM``).

Two entry points:

* ``register(name="selective_attention", backend=None)`` registers an attention function and its mask
  function with transformers' ``AttentionInterface`` / ``AttentionMaskInterface``. With
  ``attn_implementation=name`` the model keeps its own MHA expansion of the latent cache, but the
  attention itself is our op fed with HF's own indexer top-k (no dense [S, T] softmax).
* ``absorb_mla(model, backend=None)`` swaps every ``DeepseekV32Attention.forward`` for the absorbed
  MLA path production engines run: ``q_nope`` is folded through the key half of ``kv_b_proj`` into
  the latent space, attention runs in latent mode (Hkv = 1, d_v = kv_lora_rank, split rope) over a
  paged latent cache, and the value half of ``kv_b_proj`` is applied to the attention output.

How HF's batch maps onto the contract (both paths):

* HF hands us a padded batch ``[B, S]`` of queries over ``[B, Tk]`` keys plus a 4D mask
  ``[B, 1, S, Tk]`` (causal and padding). A key is real when some query may attend to it; a query is
  real when it may attend to its own key (the diagonal, bottom-right aligned). Only real tokens are
  passed on, as varlen sequences (``cu_seqlens_q`` / ``cu_seqlens_k``), so left and right padding both
  work and padded queries cost nothing; their output rows are zero (HF's eager gives them
  meaningless values there, which nothing downstream reads).
* HF's indexer returns ``[B, S, topk]`` positions in padded coordinates, one selection per token
  shared by all heads; we map them to compacted positions and hand them over as ``[T, 1, topk]``.
  A selected position the mask forbids becomes -1 (HF's topk keeps picking ``-inf`` scored slots
  when fewer than ``topk`` keys are visible; its eager path masks them, and so do we).
* ``causal=True``: after compaction the real queries of a sequence are its last real keys, which
  is exactly the contract's bottom-right alignment. The mask lookup above already enforces
  causality, so this is the contract stating what the kernel may skip, not a second filter with
  different semantics.
"""

from __future__ import annotations

import types
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..api import selective_attention
from ..inputs import FLOAT_DTYPES, QUANT_DTYPES, need_int
from .paged_cache import PagedLatentCache

__all__ = ["register", "absorb_mla", "unabsorb_mla", "PagedLatentCacheLayer", "attention_forward"]


# --------------------------------------------------------------------------------------------------
# HF's padded batch -> varlen
# --------------------------------------------------------------------------------------------------

def _allowed(mask: Tensor) -> Tensor:
    """[B, 1, S, Tk] mask (bool True = attend, or additive float 0 / large negative) -> bool [B, S, Tk]."""
    if mask.dim() != 4:
        raise ValueError(f"selective_attention for transformers needs a 4D attention mask, got {tuple(mask.shape)}")
    m = mask[:, 0]
    if m.dtype == torch.bool:
        return m
    # eager_mask writes 0 where allowed and finfo(dtype).min elsewhere; anything far below 0 is masked.
    return m > torch.finfo(m.dtype).min / 2


class _Varlen:
    """Real-token bookkeeping of one padded HF step: which queries/keys are real, and where they go."""

    def __init__(self, allowed: Tensor):
        B, S, Tk = allowed.shape
        self.B, self.S, self.Tk = B, S, Tk
        self.allowed = allowed
        diag = torch.arange(S, device=allowed.device) + (Tk - S)
        self.q_real = allowed[:, torch.arange(S, device=allowed.device), diag]           # [B, S]
        self.k_real = allowed.any(dim=1)                                                # [B, Tk]
        # Queries' own keys count as real even when the mask row is empty for odd masks.
        self.k_real[:, Tk - S:] |= self.q_real
        self.q_lens = self.q_real.sum(1, dtype=torch.int32)
        self.k_lens = self.k_real.sum(1, dtype=torch.int32)
        self.cu_seqlens_q = torch.nn.functional.pad(self.q_lens.cumsum(0, dtype=torch.int32), (1, 0))
        self.cu_seqlens_k = torch.nn.functional.pad(self.k_lens.cumsum(0, dtype=torch.int32), (1, 0))
        # padded key position -> position inside its compacted sequence (-1 for padding)
        pos = self.k_real.cumsum(1, dtype=torch.int32) - 1
        self.k_pos = torch.where(self.k_real, pos, torch.full_like(pos, -1))

    def indices(self, topk: Tensor, k_pos: Optional[Tensor] = None) -> Tensor:
        """HF top-k [B, S, K] (padded key coordinates) -> [T_real, 1, K] int32 compacted, -1 = dropped."""
        k_pos = self.k_pos if k_pos is None else k_pos
        idx = topk.long().clamp(0, self.Tk - 1)
        ok = self.allowed.gather(2, idx) & (topk >= 0)
        mapped = k_pos.unsqueeze(1).expand(-1, self.S, -1).gather(2, idx)
        mapped = torch.where(ok, mapped, torch.full_like(mapped, -1))
        return mapped[self.q_real].unsqueeze(1).to(torch.int32)

    def scatter_out(self, out: Tensor) -> Tensor:
        """[T_real, ...] -> [B, S, ...] with zero rows at padded queries."""
        full = out.new_zeros((self.B, self.S) + tuple(out.shape[1:]))
        full[self.q_real] = out
        return full


# --------------------------------------------------------------------------------------------------
# 1. register(): our op behind HF's AttentionInterface
# --------------------------------------------------------------------------------------------------

def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                      scaling: Optional[float] = None, dropout: float = 0.0, indices: Optional[Tensor] = None,
                      backend: Optional[str] = None, **kwargs) -> Tuple[Tensor, None]:
    """HF attention-interface function: query [B, H, S, D], key [B, Hkv, Tk, D], value [B, Hkv, Tk, Dv],
    indices [B, S, K] from the DeepSeek-V3.2 indexer. Returns ([B, S, H, Dv], None)."""
    if dropout and module.training:
        raise NotImplementedError("selective_attention has no attention dropout; use eval() or dropout 0")
    B, H, S, _ = query.shape
    Tk = key.shape[2]
    if attention_mask is None:
        # No mask: HF decided every key is visible to every query except the causal future.
        q_pos = torch.arange(S, device=query.device) + (Tk - S)
        allowed = (torch.arange(Tk, device=query.device)[None, :] <= q_pos[:, None]).expand(B, S, Tk)
    else:
        allowed = _allowed(attention_mask)[..., :Tk]
    if indices is None:
        # Not an indexed model (or HF folded the selection into the mask): select every key.
        indices = torch.arange(Tk, device=query.device, dtype=torch.int32).expand(B, S, Tk)
    vl = _Varlen(allowed)
    q = query.transpose(1, 2)[vl.q_real]                         # [T, H, D]
    k = key.transpose(1, 2)[vl.k_real]                           # [Sk, Hkv, D]
    v = value.transpose(1, 2)[vl.k_real]                         # [Sk, Hkv, Dv]
    out = selective_attention(
        q, k, vl.indices(indices), v=v, sm_scale=scaling, cu_seqlens_q=vl.cu_seqlens_q,
        cu_seqlens_k=vl.cu_seqlens_k, causal=True, backend=backend)
    return vl.scatter_out(out), None


def _mask_function(*args, **kwargs):
    # The DeepSeek-V3.2 indexer slices `attention_mask[:, 0]` and needs a real 4D mask, causal and
    # padding, even where a pure kernel would not; SDPA's boolean mask is exactly that and cheapest.
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register(name: str = "selective_attention", backend: Optional[str] = None) -> str:
    """Register our op (and the mask the DeepSeek-V3.2 indexer needs) under ``name``; returns ``name``.

    Then ``DeepseekV32ForCausalLM.from_pretrained(..., attn_implementation=name)`` or
    ``model.config._attn_implementation = name`` runs attention through ``selective_attention`` with
    ``backend`` (None = automatic choice).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def fn(module, query, key, value, attention_mask, **kwargs):
        kwargs.setdefault("backend", backend)
        return attention_forward(module, query, key, value, attention_mask, **kwargs)

    fn.__name__ = f"selective_attention_forward[{name}]"
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _mask_function)
    return name


# --------------------------------------------------------------------------------------------------
# 3. The paged latent cache as an HF cache layer
# --------------------------------------------------------------------------------------------------

def _layer_base():
    from transformers.cache_utils import DynamicIndexedLayer
    return DynamicIndexedLayer


# The methods of PagedLatentCacheLayer, declared without its transformers base class (a mixin placed
# before it in the MRO by _make_layer_class), so that importing this module needs no transformers.
class _PagedLatentLayer:
    """HF cache layer for the absorbed path: the latent lives in a ``PagedLatentCache`` (real tokens
    only); the indexer's keys stay in HF's own storage (inherited), since HF's indexer reads them.

    HF positions are padded (every sequence of the batch has ``padded_length`` slots); ``k_pos``
    maps each padded slot to its row in the paged sequence, or -1 for padding.
    """

    def __init__(self, page_size: int = 64, cache_dtype: Optional[torch.dtype] = None, scale_block: int = 128,
                 **kwargs):
        super().__init__(**kwargs)
        self.page_size = page_size
        self.cache_dtype = cache_dtype  # None: the model's dtype; float8_e4m3fn / int8: quantized latent
        self.scale_block = scale_block
        self.paged: Optional[PagedLatentCache] = None
        self.padded_length = 0
        self.k_pos: Optional[Tensor] = None

    def lazy_initialization(self, key_states, value_states):  # HF's abstract hook; unused here
        self.device = key_states.device
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise RuntimeError("PagedLatentCacheLayer is written by the absorbed MLA forward only "
                           "(absorb_mla); the HF eager path cannot use it")

    def append(self, latent: Tensor, rope: Tensor, new_real: Tensor) -> None:
        """latent [B, S, R], rope [B, S, Dr], new_real [B, S] bool: store the real rows."""
        B, S, R = latent.shape
        if self.paged is None:
            # The rope part stays in the model's dtype (the queries'): the op computes in q's dtype.
            self.paged = PagedLatentCache(B, R, rope.shape[-1], page_size=self.page_size,
                                          dtype=self.cache_dtype or latent.dtype, device=latent.device,
                                          scale_block=self.scale_block, rope_dtype=rope.dtype)
            self.k_pos = torch.empty(B, 0, dtype=torch.int32, device=latent.device)
            self.device = latent.device
            self.is_initialized = True
        old = self.paged.seqlens_k.to(latent.device)
        counts = new_real.sum(1)
        self.paged.append(latent[new_real], rope[new_real], lengths=counts.tolist())
        pos = old[:, None] + new_real.cumsum(1, dtype=torch.int32) - 1
        pos = torch.where(new_real, pos, torch.full_like(pos, -1)).to(torch.int32)
        self.k_pos = torch.cat([self.k_pos, pos], dim=1)
        self.padded_length += S

    def get_seq_length(self) -> int:
        return self.padded_length

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.padded_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def memory_bytes(self) -> int:
        """Latent pages + block table + position map (the indexer keys are HF's, counted apart)."""
        if self.paged is None:
            return 0
        return self.paged.memory_bytes() + self.k_pos.numel() * self.k_pos.element_size()

    def reset(self) -> None:
        super().reset()
        self.paged = None
        self.padded_length = 0
        self.k_pos = None
        self.is_initialized = False

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("PagedLatentCacheLayer: beam search / cache cropping are not supported")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported

    def offload(self):  # keep the pages where they are
        pass

    def prefetch(self):
        pass


def _make_layer_class():
    """``PagedLatentCacheLayer``: the methods above over transformers' indexed cache layer."""
    return type("PagedLatentCacheLayer", (_PagedLatentLayer, _layer_base()),
                {"__doc__": _PagedLatentLayer.__doc__, "__module__": __name__,
                 "__qualname__": "PagedLatentCacheLayer"})


_LAYER_CLASS = None


def _layer_class():
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = _make_layer_class()
    return _LAYER_CLASS


def __getattr__(name):
    # `PagedLatentCacheLayer` subclasses a transformers class, so it is built on first access
    # (PEP 562) rather than at import: importing this module must not require transformers.
    if name == "PagedLatentCacheLayer":
        return _layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# 2. absorb_mla(): absorbed MLA forward over the paged latent cache
# --------------------------------------------------------------------------------------------------

def _absorbed_forward(self, hidden_states: Tensor, position_embeddings, attention_mask: Tensor,
                      cache=None, position_ids=None, **kwargs):
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb_interleave

    if "past_key_values" in kwargs and cache is None:  # older spelling of the cache argument
        cache = kwargs.pop("past_key_values")
    B, S = hidden_states.shape[:-1]
    H, dn, dr, dv, R = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank

    q_resid = self.q_a_layernorm(self.q_a_proj(hidden_states))
    q_states = self.q_b_proj(q_resid).view(B, S, H, dn + dr).transpose(1, 2)      # [B, H, S, dn+dr]
    q_pass, q_rot = torch.split(q_states, [dn, dr], dim=-1)
    compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
    kv_pass, k_rot = torch.split(compressed_kv, [R, dr], dim=-1)
    latent = self.kv_a_layernorm(kv_pass)                                            # [B, S, R]
    k_rot = k_rot.view(B, 1, S, dr)
    cos, sin = position_embeddings
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)          # HF's exact rotation

    # HF's mask covers the cached + new padded positions; the new tokens' own slots are its last S.
    allowed = _allowed(attention_mask)
    layer = _paged_layer(cache, self.layer_idx, self._sa_page_size, self._sa_cache_dtype, self._sa_scale_block)
    vl = _Varlen(allowed)
    layer.append(latent, k_rot[:, 0], vl.q_real)

    topk = self.indexer(hidden_states, q_resid, position_embeddings, attention_mask[:, 0, :, :], position_ids,
                        cache=cache)

    # Fold W_UK into the query: q_nope . (W_UK c) = (W_UK^T q_nope) . c, per head.
    w = self.kv_b_proj.weight.view(H, dn + dv, R)
    w_uk, w_uv = w[:, :dn], w[:, dn:]
    q_real = vl.q_real
    q_lat = torch.einsum("thd,hdr->thr", q_pass.transpose(1, 2)[q_real], w_uk)      # [T, H, R]
    q_rope = q_rot.transpose(1, 2)[q_real]                                           # [T, H, dr]
    out_lat = selective_attention(
        q_lat.contiguous(), indices=vl.indices(topk, layer.k_pos), q_rope=q_rope.contiguous(),
        sm_scale=self.scaling, cu_seqlens_q=vl.cu_seqlens_q, causal=True, backend=self._sa_backend,
        **layer.paged.attention_kwargs())                                            # [T, H, R]
    out = torch.einsum("thr,hvr->thv", out_lat, w_uv)                                # [T, H, dv]
    attn_output = vl.scatter_out(out).reshape(B, S, H * dv)
    return self.o_proj(attn_output), None


def _paged_layer(cache, layer_idx: int, page_size: int, cache_dtype=None, scale_block: int = 128):
    cls = _layer_class()
    options = dict(page_size=page_size, cache_dtype=cache_dtype, scale_block=scale_block)
    if cache is None:
        return cls(**options)  # use_cache=False: a cache that lives for this one call
    current = cache.layers[layer_idx]
    if not isinstance(current, cls):
        if current.get_seq_length() != 0:
            raise RuntimeError(f"absorb_mla: cache layer {layer_idx} already holds HF's own (expanded-path) "
                               "entries; start generation with a fresh cache after absorb_mla(model)")
        # First use of a fresh HF cache: swap its layer for the paged latent one (same role, MLA storage).
        current = cls(**options)
        cache.layers[layer_idx] = current
    return current


def absorb_mla(model, backend: Optional[str] = None, page_size: int = 64, cache_dtype: Optional[torch.dtype] = None,
               scale_block: int = 128):
    """Run every DeepSeek-V3.2 attention layer of ``model`` the absorbed-MLA way, in place; returns model.

    The weights are untouched (``kv_b_proj`` is split on the fly), so ``unabsorb_mla(model)`` restores
    HF's forward. Caches: the first forward with a fresh HF cache (as ``generate()`` creates) turns its
    layers into ``PagedLatentCacheLayer``s of ``page_size`` rows per page. ``cache_dtype`` (default:
    the model's dtype) may be ``torch.float8_e4m3fn`` or ``torch.int8``: the latent is then quantized
    as it is cached (tiles of ``scale_block`` values, docs/contract.md "Quantized caches"), the rope
    part kept in the model's dtype.
    """
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention

    if cache_dtype is not None and cache_dtype not in FLOAT_DTYPES and cache_dtype not in QUANT_DTYPES:
        raise TypeError(f"absorb_mla: cache_dtype must be None, a float dtype, float8_e4m3fn or int8, "
                        f"got {cache_dtype!r}")
    need_int("scale_block", scale_block, lo=1)
    n = 0
    for module in model.modules():
        if isinstance(module, DeepseekV32Attention):
            module._sa_backend = backend
            module._sa_page_size = page_size
            module._sa_cache_dtype = cache_dtype
            module._sa_scale_block = scale_block
            module.forward = types.MethodType(_absorbed_forward, module)
            n += 1
    if n == 0:
        raise ValueError("absorb_mla: the model has no DeepseekV32Attention module")
    return model


def unabsorb_mla(model):
    """Undo ``absorb_mla``: back to HF's own attention forward."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module, "_sa_page_size", None) is not None:
            del module.forward
            del module._sa_backend, module._sa_page_size, module._sa_cache_dtype, module._sa_scale_block
    return model
