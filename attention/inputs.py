"""One validated inputs object per call (STYLE.md rule 4: validate once, up front; kernels trust it).

Every shape, dtype, device and range rule of SPEC.md section 1 is checked here, before any kernel
runs, and raises ``ValueError``/``TypeError`` naming the argument. Rules on tensor *contents*
(monotone ``cu_seqlens_*``, table entries inside the cache, ``seqlens_k`` within the table) cost a
device sync on a GPU/NPU, so they are checked always for CPU tensors and elsewhere only with
``ATTENTION_DEBUG=1``; device kernels mask anything out of range regardless.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPTIONAL_TENSORS = ("v", "q_rope", "kv_rope", "cu_seqlens_q", "cu_seqlens_k", "block_table", "seqlens_k", "attn_sink")
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass
class SelectiveAttentionInputs:
    """Arguments of ``selective_attention`` after validation, plus derived sizes."""

    q: Tensor
    kv: Tensor
    indices: Tensor
    v: Optional[Tensor]
    d_v: int  # value width (always set: v's width, or the latent d_v)
    q_rope: Optional[Tensor]
    kv_rope: Optional[Tensor]
    sm_scale: float
    block_size: int
    cu_seqlens_q: Optional[Tensor]
    cu_seqlens_k: Optional[Tensor]
    block_table: Optional[Tensor]
    seqlens_k: Optional[Tensor]
    causal: bool
    attn_sink: Optional[Tensor]  # float32 [H]
    backend: Optional[str] = None

    # ---- derived ----
    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def paged(self) -> bool:
        return self.kv.dim() == 4

    @property
    def latent(self) -> bool:
        return self.v is None

    @property
    def num_tokens(self) -> int:
        return self.q.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.kv.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[2]

    @property
    def rope_dim(self) -> int:
        return 0 if self.q_rope is None else self.q_rope.shape[-1]

    @property
    def topk(self) -> int:
        return self.indices.shape[2]

    @property
    def page_size(self) -> int:
        return self.kv.shape[1] if self.paged else 0

    @property
    def num_seqs(self) -> int:
        if self.cu_seqlens_q is not None:
            return self.cu_seqlens_q.shape[0] - 1
        return 1

    @property
    def features(self) -> frozenset:
        """Named features these inputs use; backends declare which they support."""
        f = {"latent" if self.latent else "separate_v", "paged" if self.paged else "contiguous"}
        if self.q_rope is not None:
            f.add("rope")
        if self.block_size > 1:
            f.add("block")
        if self.causal:
            f.add("causal")
        if self.attn_sink is not None:
            f.add("sink")
        if self.cu_seqlens_q is not None and self.num_seqs > 1:
            f.add("varlen")
        if self.indices.shape[1] == 1 and self.num_kv_heads > 1:
            f.add("shared_indices")
        return frozenset(f)

    def reference_kwargs(self) -> dict:
        """Keyword arguments for ``python_ref.selective_attention``."""
        return dict(
            v=self.v, d_v=self.d_v, q_rope=self.q_rope, kv_rope=self.kv_rope, sm_scale=self.sm_scale,
            block_size=self.block_size, cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k,
            block_table=self.block_table, seqlens_k=self.seqlens_k, causal=self.causal, attn_sink=self.attn_sink,
        )

    def describe(self) -> str:
        return (f"T={self.num_tokens} H={self.num_heads} Hkv={self.num_kv_heads} Dqk={self.head_dim} "
                f"Dv={self.d_v} Dr={self.rope_dim} K={self.topk} block={self.block_size} "
                f"dtype={str(self.dtype).replace('torch.', '')} {'paged' if self.paged else 'contiguous'}")


def debug_checks_enabled() -> bool:
    return os.environ.get("ATTENTION_DEBUG", "0") not in ("", "0", "false", "False")


def _dt(x) -> str:
    return str(x).replace("torch.", "")


_FLOAT32_MAX = torch.finfo(torch.float32).max


def finite_float(name: str, x) -> float:
    """A Python float from an int/float argument that is finite *in float32* (negative allowed), else
    TypeError/ValueError. Every backend computes in float32 (SPEC.md section 1), so 1e300 would become
    inf there: rejected rather than silently different per backend."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    try:
        x = float(x)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{name} must be finite in float32 (|x| <= {_FLOAT32_MAX:.7g}), got {x}") from None
    if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
        raise ValueError(f"{name} must be finite in float32 (|x| <= {_FLOAT32_MAX:.7g}), got {x}")
    return x


def _need_tensor(name: str, x, optional: bool = False):
    if x is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _need_rank(name: str, x: Tensor, ranks, what: str):
    if x.dim() not in ranks:
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")


def _need_int_tensor(name: str, x: Tensor, rank: int, what: str):
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {_dt(x.dtype)}")
    _need_rank(name, x, (rank,), what)


def _is_fake(x: Tensor) -> bool:
    # FakeTensor / meta tensors carry no data: content checks are skipped for them.
    return x.device.type == "meta" or type(x).__name__ in ("FakeTensor", "FunctionalTensor")


def validate(
    q, kv, indices, *, v=None, d_v=None, q_rope=None, kv_rope=None, sm_scale=None, block_size=1,
    cu_seqlens_q=None, cu_seqlens_k=None, block_table=None, seqlens_k=None, causal=False,
    attn_sink=None, backend=None, check_contents: Optional[bool] = None,
) -> SelectiveAttentionInputs:
    """Check every rule of SPEC.md section 1 and return the inputs object."""
    return validate_positional(q, kv, indices, v, d_v, q_rope, kv_rope, sm_scale, block_size, cu_seqlens_q,
                               cu_seqlens_k, block_table, seqlens_k, causal, attn_sink, backend, check_contents)


def validate_positional(q, kv, indices, v, d_v, q_rope, kv_rope, sm_scale, block_size, cu_seqlens_q,
                        cu_seqlens_k, block_table, seqlens_k, causal, attn_sink, backend,
                        check_contents=None) -> SelectiveAttentionInputs:
    """``validate`` with the op schema's positional order (the op's hot path: no keyword packing)."""
    _need_tensor("q", q)
    _need_tensor("kv", kv)
    _need_tensor("indices", indices)
    dev = q.device
    # One pass over the optional tensors: type, then device (the common decode call has none).
    for name, x in zip(_OPTIONAL_TENSORS, (v, q_rope, kv_rope, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k,
                                           attn_sink)):
        if x is not None:
            _need_tensor(name, x)
            if x.device != dev:
                raise ValueError(f"{name} must be on q's device {dev}, got {x.device}")

    # ---- dtypes ----
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {_dt(q.dtype)}")
    for name, x in (("kv", kv), ("v", v), ("q_rope", q_rope), ("kv_rope", kv_rope)):
        if x is not None and x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {_dt(q.dtype)}, got {_dt(x.dtype)}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int32 or int64, got {_dt(indices.dtype)}")

    # ---- devices ----
    for name, x in (("kv", kv), ("indices", indices)):
        if x.device != dev:
            raise ValueError(f"{name} must be on q's device {dev}, got {x.device}")

    # ---- shapes ----
    _need_rank("q", q, (3,), "[T, H, Dqk]")
    T, H, Dqk = q.shape
    _need_rank("kv", kv, (3, 4), "[S, Hkv, Dqk] or paged [P, page, Hkv, Dqk]")
    paged = kv.dim() == 4
    lead = tuple(kv.shape[:-1])  # (S, Hkv) or (P, page, Hkv)
    Hkv = kv.shape[-2]
    if Hkv < 1:
        raise ValueError(f"kv must have at least one kv head, got shape {tuple(kv.shape)}")
    if H < 1 or Dqk < 1:
        raise ValueError(f"q must have H >= 1 and Dqk >= 1, got shape {tuple(q.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"q's head count H={H} must be a multiple of kv's head count Hkv={Hkv}")
    if kv.shape[-1] != Dqk:
        raise ValueError(f"kv's last dimension must equal q's head width Dqk={Dqk}, got {kv.shape[-1]}")
    if paged and kv.shape[1] < 1:
        raise ValueError(f"kv's page size must be >= 1, got shape {tuple(kv.shape)}")

    if v is not None:
        if v.dim() != kv.dim() or tuple(v.shape[:-1]) != lead:
            raise ValueError(f"v must have kv's leading shape {lead + ('Dv',)}, got {tuple(v.shape)}")
        if v.shape[-1] < 1:
            raise ValueError(f"v must have a value width >= 1, got shape {tuple(v.shape)}")
        if d_v is not None and int(d_v) != v.shape[-1]:
            raise ValueError(f"d_v must be None or v's width {v.shape[-1]} when v is given, got {d_v}")
        Dv = v.shape[-1]
    else:
        if d_v is None:
            Dv = Dqk
        else:
            if isinstance(d_v, bool) or not isinstance(d_v, int):
                raise TypeError(f"d_v must be an int, got {type(d_v).__name__}")
            if not 1 <= d_v <= Dqk:
                raise ValueError(f"d_v must be in [1, Dqk={Dqk}] in latent mode (value = kv[..., :d_v]), got {d_v}")
            Dv = d_v

    if (q_rope is None) != (kv_rope is None):
        given = "q_rope" if q_rope is not None else "kv_rope"
        missing = "kv_rope" if q_rope is not None else "q_rope"
        raise ValueError(f"{missing} must be given together with {given} (both or neither)")
    Dr = 0
    if q_rope is not None:
        _need_rank("q_rope", q_rope, (3,), "[T, H, Dr]")
        if tuple(q_rope.shape[:2]) != (T, H):
            raise ValueError(f"q_rope must have q's leading shape ({T}, {H}, Dr), got {tuple(q_rope.shape)}")
        Dr = q_rope.shape[2]
        if kv_rope.dim() != kv.dim() or tuple(kv_rope.shape[:-1]) != lead or kv_rope.shape[-1] != Dr:
            raise ValueError(f"kv_rope must have shape {lead + (Dr,)} (kv's leading shape, q_rope's width), "
                             f"got {tuple(kv_rope.shape)}")

    _need_rank("indices", indices, (3,), "[T, Hkv, K] (or [T, 1, K])")
    if indices.shape[0] != T:
        raise ValueError(f"indices must have T={T} rows (one per query token), got shape {tuple(indices.shape)}")
    if indices.shape[1] not in (1, Hkv):
        raise ValueError(f"indices' middle dimension must be Hkv={Hkv} or 1, got shape {tuple(indices.shape)}")

    # ---- scalars ----
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    sm_scale = (Dqk + Dr) ** -0.5 if sm_scale is None else finite_float("sm_scale", sm_scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")

    if attn_sink is not None:
        if not attn_sink.is_floating_point():
            raise TypeError(f"attn_sink must be a float tensor, got {_dt(attn_sink.dtype)}")
        if attn_sink.dim() != 1 or attn_sink.shape[0] != H:
            raise ValueError(f"attn_sink must have shape [H]=({H},), got {tuple(attn_sink.shape)}")
        attn_sink = attn_sink.to(torch.float32)

    # ---- sequences ----
    check_sequence_args(paged, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k)

    inp = SelectiveAttentionInputs(
        q=q, kv=kv, indices=indices, v=v, d_v=Dv, q_rope=q_rope, kv_rope=kv_rope, sm_scale=sm_scale,
        block_size=block_size, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, block_table=block_table,
        seqlens_k=seqlens_k, causal=causal, attn_sink=attn_sink, backend=backend,
    )
    if check_contents is None:
        check_contents = dev.type == "cpu" or debug_checks_enabled()
    if check_contents and not _is_fake(q):
        check_sequence_contents(inp)
    return inp


def check_sequence_args(paged: bool, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k, *, cache: str = "kv",
                        paged_shape: str = "[P, page, Hkv, Dqk]", contiguous_shape: str = "[S, Hkv, Dqk]") -> int:
    """Shape rules of the sequence arguments, shared by every op over a kv-like cache (the
    attention's kv, the indexer's k_idx). Returns the number of sequences B."""
    if cu_seqlens_q is not None:
        _need_int_tensor("cu_seqlens_q", cu_seqlens_q, 1, "[B+1]")
        if cu_seqlens_q.shape[0] < 2:
            raise ValueError(f"cu_seqlens_q must have B+1 >= 2 entries, got shape {tuple(cu_seqlens_q.shape)}")
    B = cu_seqlens_q.shape[0] - 1 if cu_seqlens_q is not None else 1
    where = " (from cu_seqlens_q)" if cu_seqlens_q is not None else " (one sequence without cu_seqlens_q)"
    if paged:
        if cu_seqlens_k is not None:
            raise ValueError(f"cu_seqlens_k is for a contiguous {cache}; a paged {cache} takes block_table and seqlens_k")
        if block_table is None:
            raise ValueError(f"block_table is required with a paged {cache} {paged_shape}")
        if seqlens_k is None:
            raise ValueError(f"seqlens_k is required with a paged {cache} {paged_shape}")
        _need_int_tensor("block_table", block_table, 2, "[B, max_pages]")
        _need_int_tensor("seqlens_k", seqlens_k, 1, "[B]")
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must have B={B} rows{where}, got shape {tuple(block_table.shape)}")
        if seqlens_k.shape[0] != B:
            raise ValueError(f"seqlens_k must have B={B} entries{where}, got shape {tuple(seqlens_k.shape)}")
    else:
        if block_table is not None:
            raise ValueError(f"block_table is for a paged {cache} {paged_shape}; {cache} is contiguous {contiguous_shape}")
        if seqlens_k is not None:
            raise ValueError(f"seqlens_k is for a paged {cache}; a contiguous {cache} takes cu_seqlens_k")
        if cu_seqlens_k is not None:
            _need_int_tensor("cu_seqlens_k", cu_seqlens_k, 1, "[B+1]")
            if cu_seqlens_k.shape[0] != B + 1:
                raise ValueError(f"cu_seqlens_k must have B+1={B + 1} entries like cu_seqlens_q{where}, "
                                 f"got shape {tuple(cu_seqlens_k.shape)}")
        elif B != 1:
            raise ValueError(f"cu_seqlens_k is required with a contiguous {cache} when cu_seqlens_q describes "
                             f"B={B} sequences (the default [0, S] describes one)")
    return B


def check_sequence_contents(inp: SelectiveAttentionInputs) -> None:
    """Content rules (reads the small metadata tensors on the host: a sync on a device)."""
    if inp.cu_seqlens_q is None and inp.cu_seqlens_k is None and not inp.paged:
        return  # one contiguous sequence: nothing to read (the decode hot path)
    check_sequence_values(inp.num_tokens, inp.kv, inp.paged, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.block_table,
                          inp.seqlens_k, cache="the cache")


def check_sequence_values(T: int, cache_tensor: Tensor, paged: bool, cu_seqlens_q, cu_seqlens_k, block_table,
                          seqlens_k, *, cache: str) -> Tensor:
    """The content rules of the sequence arguments, shared by every op over a kv-like cache.

    Returns the per-sequence key lengths (int64, on the CPU). Reads the metadata on the host.
    """
    if cu_seqlens_q is not None:
        cq = cu_seqlens_q.detach().cpu().to(torch.int64)
        if cq[0].item() != 0 or cq[-1].item() != T:
            raise ValueError(f"cu_seqlens_q must start at 0 and end at T={T}, got {cq.tolist()}")
        if bool((cq[1:] < cq[:-1]).any()):
            raise ValueError(f"cu_seqlens_q must be non-decreasing, got {cq.tolist()}")
    if not paged:
        S = cache_tensor.shape[0]
        if cu_seqlens_k is None:
            return torch.tensor([S])
        ck = cu_seqlens_k.detach().cpu().to(torch.int64)
        if ck[0].item() != 0 or ck[-1].item() > S:
            raise ValueError(f"cu_seqlens_k must start at 0 and end at or below S={S}, got {ck.tolist()}")
        if bool((ck[1:] < ck[:-1]).any()):
            raise ValueError(f"cu_seqlens_k must be non-decreasing, got {ck.tolist()}")
        return ck[1:] - ck[:-1]
    P, page = cache_tensor.shape[0], cache_tensor.shape[1]
    table = block_table.detach().cpu().to(torch.int64)
    lens = seqlens_k.detach().cpu().to(torch.int64)
    cap = table.shape[1] * page
    if bool((lens < 0).any()):
        raise ValueError(f"seqlens_k must be >= 0, got {lens.tolist()}")
    if bool((lens > cap).any()):
        raise ValueError(f"seqlens_k must be at most the block table's capacity "
                         f"max_pages*page={table.shape[1]}*{page}={cap}, got {lens.tolist()}")
    need = (lens + page - 1) // page  # pages each sequence actually reads
    used = torch.arange(table.shape[1])[None, :] < need[:, None]
    bad = used & ((table < 0) | (table >= P))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} names no page of {cache} "
                         f"(P={P}); entries needed by seqlens_k must be in [0, {P})")
    return lens
