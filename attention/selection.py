"""Selection (docs/spec.md section 2): ``lightning_indexer``, ``topk_indices`` and the fused ``select``.

Each call is validated once into a :class:`SelectionInputs` (errors name the argument) and handed to
the backend the registry (attention/registry.py) chooses, the same one that chooses the attention
op's: a backend lists the ops it implements, so the CUDA C++ one declares ``topk_indices`` only.

=========== ======== ============================================== ===================================
backend     devices  ops                                            notes
=========== ======== ============================================== ===================================
cuda        cuda     topk_indices                                   csrc/cuda radix select; when built
triton      cuda     lightning_indexer, select                      CPU tensors too under
                                                                    TRITON_INTERPRET=1 (tests)
reference   any      all                                            python_ref; first on the CPU
=========== ======== ============================================== ===================================

``backend=`` (or ``ATTENTION_SELECTION_BACKEND``) forces one; a forced backend that cannot run
raises with its reasons. ``torch.ops.attention.topk_indices`` is the torch.library op; its CUDA
kernel is the CUDA C++ top-k when the extension is built.

Block selection (NSA-style): ``select(..., block_size=b, block_reduce="max" | "mean")`` returns
*block* indices for ``selective_attention(block_size=b)``; a block's score is the max (default) or
the mean of its valid positions' index scores (see python_ref.selection.block_scores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import python_ref
from python_ref.selection import BLOCK_REDUCES

from . import registry
from .inputs import (FLOAT_DTYPES, KVLayout, debug_checks_enabled, dtype_name,
                     finite_float, is_fake, need_backend_name, need_choice, need_int, need_int_tensor, need_rank,
                     need_tensor)

__all__ = ["lightning_indexer", "topk_indices", "select", "block_scores", "SelectionInputs", "validate_selection",
           "selection_backends", "choose_selection_backend"]

OPS = ("lightning_indexer", "topk_indices", "select")

#: Quantized indexer inputs (DeepGEMM's fp8_mqa_logits and its int8 sibling) -> the registry feature a
#: backend declares to take them (opt-in, registry.SELECTION_FEATURES).
INDEXER_QUANT_DTYPES = {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}


@dataclass
class SelectionInputs:
    """Validated arguments of one selection call (``q_idx`` is None for ``topk_indices``)."""

    op: str
    q_idx: Optional[Tensor] = None
    k_idx: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    scores: Optional[Tensor] = None
    k: int = 0
    scale: Optional[float] = None
    layout: Optional[KVLayout] = None  # k_idx's sequences (None for topk_indices)
    causal: bool = True
    block_size: int = 1
    block_reduce: str = "max"
    backend: Optional[str] = None
    # Quantized q_idx / k_idx: float32 scales, [T, Hi] (None: 1) and k_idx.shape[:-1].
    q_idx_scale: Optional[Tensor] = None
    k_idx_scale: Optional[Tensor] = None
    # Per-token key windows [ks[t], ke[t]) (both or neither), int32/int64 [T].
    cu_seqlen_ks: Optional[Tensor] = None
    cu_seqlen_ke: Optional[Tensor] = None
    lengths: Optional[Tensor] = None  # topk_indices: row t ranks positions [0, lengths[t]) only

    # The sequence arguments, as the kernels read them (one KVLayout holds and checks them).
    cu_seqlens_q = property(lambda self: self.layout.cu_seqlens_q)
    cu_seqlens_k = property(lambda self: self.layout.cu_seqlens_k)
    block_table = property(lambda self: self.layout.block_table)
    seqlens_k = property(lambda self: self.layout.seqlens_k)
    max_seqlen_k = property(lambda self: self.layout.max_seqlen_k)

    #: environment variable that forces a backend for the selection ops (the ``backend`` argument wins)
    force_env = "ATTENTION_SELECTION_BACKEND"

    @property
    def device(self) -> torch.device:
        return (self.scores if self.q_idx is None else self.q_idx).device

    @property
    def quantized(self) -> bool:
        return self.q_idx is not None and self.q_idx.dtype in INDEXER_QUANT_DTYPES

    @property
    def dtype(self) -> torch.dtype:
        """The dtype backends declare: the inputs' own, or float32 (the compute dtype) for quantized
        ones, whose storage format is a feature ("fp8" / "int8") a backend opts into."""
        if self.quantized:
            return torch.float32
        return (self.scores if self.q_idx is None else self.q_idx).dtype

    @property
    def features(self) -> frozenset:
        """Named features these inputs use (registry.SELECTION_FEATURES); backends declare theirs."""
        if self.q_idx is None:
            return frozenset({"lengths"}) if self.lengths is not None else frozenset()
        f = {"paged" if self.paged else "contiguous"}
        if self.quantized:
            f.add(INDEXER_QUANT_DTYPES[self.q_idx.dtype])
        if self.cu_seqlen_ks is not None:
            f.add("window")
        if self.causal:
            f.add("causal")
        if self.block_size > 1:
            f.add("block")
        if self.cu_seqlens_q is not None and self.cu_seqlens_q.shape[0] > 2:
            f.add("varlen")
        return frozenset(f)

    @property
    def sizes(self) -> tuple:
        """Every size a backend's declared limits may read: (k, block_size, T, W or Hi, Di)."""
        if self.q_idx is None:
            return (self.k, 1) + tuple(self.scores.shape)
        return (self.k, self.block_size) + tuple(self.q_idx.shape)

    def choice_key(self) -> tuple:
        return (self.device.type, self.dtype, self.features, self.sizes)

    @property
    def paged(self) -> bool:
        return self.k_idx is not None and self.k_idx.dim() == 3

    def indexer_kwargs(self) -> dict:
        kw = dict(scale=self.scale, max_seqlen_k=self.max_seqlen_k, causal=self.causal, **self.layout.kwargs())
        for name in ("q_idx_scale", "k_idx_scale", "cu_seqlen_ks", "cu_seqlen_ke"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw

    def describe(self) -> str:
        if self.q_idx is None:
            return f"topk_indices scores={tuple(self.scores.shape)} k={self.k}"
        return (f"{self.op} q_idx={tuple(self.q_idx.shape)} k_idx={tuple(self.k_idx.shape)} k={self.k} "
                f"block={self.block_size} {'paged' if self.paged else 'contiguous'}")


# ----------------------------------------------------------------------------- validation
# Positions come back as int32: a score row or a sequence longer than this has unrepresentable ones.
MAX_POSITIONS = 2**31 - 1


def validate_scores(scores, k, backend=None, lengths=None, check_contents: Optional[bool] = None) -> SelectionInputs:
    need_tensor("scores", scores)
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a float tensor, got {dtype_name(scores.dtype)}")
    need_rank("scores", scores, (2,), "[T, W]")
    if scores.shape[1] > MAX_POSITIONS:
        raise ValueError(f"scores must have at most {MAX_POSITIONS} columns (positions are int32), "
                         f"got shape {tuple(scores.shape)}")
    need_int("k", k)
    need_backend_name(backend)
    if lengths is not None:
        T, W = scores.shape
        _need_per_token("lengths", lengths, T, scores.device, "scores")
        if check_contents is None:
            check_contents = scores.device.type == "cpu" or debug_checks_enabled()
        if check_contents and lengths.numel() and not is_fake(lengths) and not torch.compiler.is_compiling():
            # On a device the kernels clamp to [0, W] instead (no sync): a bad length never reads past W.
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > W:
                raise ValueError(f"lengths must be in [0, W={W}] (the scores' width), got values in [{lo}, {hi}]")
    return SelectionInputs(op="topk_indices", scores=scores, k=k, backend=backend, lengths=lengths)


def _need_per_token(name: str, x, T: int, device, of: str) -> None:
    """An int32/int64 [T] tensor on ``of``'s device (key windows, top-k lengths)."""
    need_int_tensor(name, x, 1, "[T]")
    if x.shape[0] != T:
        raise ValueError(f"{name} must have T={T} entries (one per row of {of}), got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {of}'s device {device}, got {x.device}")


def _check_scale(name: str, scale, of: str, x: Tensor, want: tuple) -> Optional[Tensor]:
    """A float32 per-row scale of the quantized ``x``: shape ``want`` or ``want + (1,)`` (one scale
    per row of Di, section 5's layout with scale_block >= Di). Returned as the ``want``-shaped view."""
    if scale is None:
        return None
    need_tensor(name, scale)
    if x.dtype not in INDEXER_QUANT_DTYPES:
        raise ValueError(f"{name} is only for a quantized {of} (float8_e4m3fn or int8); {of} is {dtype_name(x.dtype)}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {dtype_name(scale.dtype)}")
    if scale.device != x.device:
        raise ValueError(f"{name} must be on {of}'s device {x.device}, got {scale.device}")
    if tuple(scale.shape) == want + (1,):
        scale = scale[..., 0]
    if tuple(scale.shape) != want:
        raise ValueError(f"{name} must have shape {list(want)} (one scale per row of {of}), "
                         f"got {tuple(scale.shape)}")
    return scale


def validate_selection(op, q_idx, k_idx, weights, k=0, *, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                       block_table=None, seqlens_k=None, max_seqlen_k=None, causal=True, block_size=1,
                       block_reduce="max", q_idx_scale=None, k_idx_scale=None, cu_seqlen_ks=None,
                       cu_seqlen_ke=None, backend=None, check_contents: Optional[bool] = None) -> SelectionInputs:
    """Every shape, dtype, device and range rule of docs/spec.md section 2 (and section 1's for kv)."""
    sequence = (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("block_table", block_table),
                ("seqlens_k", seqlens_k))
    T, Hi = _check_indexer_tensors(q_idx, k_idx, weights, sequence)
    if op != "lightning_indexer":
        need_int("k", k)
    scale = _check_options(scale, causal, block_size, block_reduce, max_seqlen_k, backend)
    q_idx_scale, k_idx_scale = _check_quantized(q_idx, k_idx, q_idx_scale, k_idx_scale, T, Hi)
    _check_windows(cu_seqlen_ks, cu_seqlen_ke, T, q_idx.device)
    layout = KVLayout.check(k_idx.dim() == 3, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k, max_seqlen_k,
                            cache="k_idx", paged_shape="[P, page, Di]", contiguous_shape="[S, Di]")
    inp = SelectionInputs(op=op, q_idx=q_idx, k_idx=k_idx, weights=weights, k=int(k), scale=scale, layout=layout,
                          causal=causal, block_size=block_size, block_reduce=block_reduce, backend=backend,
                          q_idx_scale=q_idx_scale, k_idx_scale=k_idx_scale, cu_seqlen_ks=cu_seqlen_ks,
                          cu_seqlen_ke=cu_seqlen_ke)
    if check_contents is None:
        check_contents = q_idx.device.type == "cpu" or debug_checks_enabled()
    if check_contents and not is_fake(q_idx):
        # host reads of the small metadata tensors: free on the CPU, a sync elsewhere
        layout.check_values(T, k_idx, cache="k_idx")
        if cu_seqlen_ks is not None and T:
            _check_window_values(cu_seqlen_ks, cu_seqlen_ke)
    return inp


def _check_indexer_tensors(q_idx, k_idx, weights, sequence) -> tuple:
    """Types, dtypes, devices and shapes of q_idx [T, Hi, Di], k_idx [S, Di] or [P, page, Di], weights
    [T, Hi] and the (optional) sequence tensors ``sequence`` ((name, tensor) pairs). Returns (T, Hi)."""
    for name, x in (("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights)):
        need_tensor(name, x)
    for name, x in sequence:
        need_tensor(name, x, optional=True)
    if q_idx.dtype not in FLOAT_DTYPES and q_idx.dtype not in INDEXER_QUANT_DTYPES:
        raise TypeError(f"q_idx must be float32, float16 or bfloat16, or float8_e4m3fn / int8 with scales, "
                        f"got {dtype_name(q_idx.dtype)}")
    if k_idx.dtype != q_idx.dtype:
        raise TypeError(f"k_idx must have q_idx's dtype {dtype_name(q_idx.dtype)}, got {dtype_name(k_idx.dtype)}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a float tensor, got {dtype_name(weights.dtype)}")
    dev = q_idx.device
    for name, x in (("k_idx", k_idx), ("weights", weights)) + sequence:
        if x is not None and x.device != dev:
            raise ValueError(f"{name} must be on q_idx's device {dev}, got {x.device}")
    need_rank("q_idx", q_idx, (3,), "[T, Hi, Di]")
    T, Hi, Di = q_idx.shape
    if Hi < 1 or Di < 1:
        raise ValueError(f"q_idx must have Hi >= 1 and Di >= 1, got shape {tuple(q_idx.shape)}")
    need_rank("k_idx", k_idx, (2, 3), "[S, Di] or paged [P, page, Di]")
    if k_idx.shape[-1] != Di:
        raise ValueError(f"k_idx's last dimension must equal q_idx's width Di={Di}, got {k_idx.shape[-1]}")
    if k_idx.dim() == 3 and k_idx.shape[1] < 1:
        raise ValueError(f"k_idx's page size must be >= 1, got shape {tuple(k_idx.shape)}")
    if weights.dim() != 2 or tuple(weights.shape) != (T, Hi):
        raise ValueError(f"weights must have shape [T, Hi]=({T}, {Hi}), got {tuple(weights.shape)}")
    return T, Hi


def _check_options(scale, causal, block_size, block_reduce, max_seqlen_k, backend) -> Optional[float]:
    """The scalar arguments; returns ``scale`` as a finite float (or None)."""
    if scale is not None:
        scale = finite_float("scale", scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    need_int("block_size", block_size, 1)
    need_choice("block_reduce", block_reduce, BLOCK_REDUCES)
    if max_seqlen_k is not None:
        need_int("max_seqlen_k", max_seqlen_k)
        if max_seqlen_k > MAX_POSITIONS:
            raise ValueError(f"max_seqlen_k must be at most {MAX_POSITIONS} (positions are int32), got {max_seqlen_k}")
    need_backend_name(backend)
    return scale


def _check_quantized(q_idx, k_idx, q_idx_scale, k_idx_scale, T: int, Hi: int) -> tuple:
    """Quantized inputs (DeepGEMM fp8_mqa_logits: q_idx and k_idx float8_e4m3fn, k_idx with one float32
    scale per row; q's own scale, when it has one, is usually folded into weights, hence optional).
    Returns (q_idx_scale, k_idx_scale) as per-row views."""
    if k_idx_scale is None and k_idx.dtype in INDEXER_QUANT_DTYPES:
        raise ValueError(f"k_idx_scale is required with a quantized k_idx ({dtype_name(k_idx.dtype)}): "
                         f"float32 of shape {list(k_idx.shape[:-1])}, the value of row r is k_idx[r] * k_idx_scale[r]")
    return (_check_scale("q_idx_scale", q_idx_scale, "q_idx", q_idx, (T, Hi)),
            _check_scale("k_idx_scale", k_idx_scale, "k_idx", k_idx, tuple(k_idx.shape[:-1])))


def _check_windows(cu_seqlen_ks, cu_seqlen_ke, T: int, device) -> None:
    """Per-token key windows [ks, ke): both or neither, [T] integer tensors on q_idx's device."""
    for name, x in (("cu_seqlen_ks", cu_seqlen_ks), ("cu_seqlen_ke", cu_seqlen_ke)):
        if x is not None:
            _need_per_token(name, x, T, device, "q_idx")
    if (cu_seqlen_ks is None) != (cu_seqlen_ke is None):
        given, missing = ("cu_seqlen_ks", "cu_seqlen_ke") if cu_seqlen_ke is None else ("cu_seqlen_ke", "cu_seqlen_ks")
        raise ValueError(f"{missing} is required with {given}: a key window [ks, ke) needs both ends")


def _check_window_values(cu_seqlen_ks, cu_seqlen_ke) -> None:
    """Windows are masks (a bad one selects nothing, never reads out of bounds), but a window that
    starts below 0 or ends before it starts is a caller's bug (swapped arguments). Reads on the host."""
    ks, ke = cu_seqlen_ks.detach().cpu().to(torch.int64), cu_seqlen_ke.detach().cpu().to(torch.int64)
    if bool((ks < 0).any()):
        raise ValueError(f"cu_seqlen_ks must be >= 0, got min {int(ks.min())}")
    bad = (ke < ks).nonzero()
    if bad.numel():
        t = int(bad[0, 0])
        raise ValueError(f"cu_seqlen_ke must be >= cu_seqlen_ks: token {t} has the window "
                         f"[{int(ks[t])}, {int(ke[t])})")


# ----------------------------------------------------------------------------- backends
def selection_backends():
    """Registered backends that implement at least one selection op."""
    return [b for b in registry.backends() if any(b.implements(op) for op in OPS)]


def choose_selection_backend(inp: SelectionInputs) -> registry.Backend:
    return registry.choose_backend(inp)


# ----------------------------------------------------------------------------- torch.library op
# A FRAGMENT of the "attention" namespace that attention/ops.py defines. Plain define/impl rather than
# @custom_op: ~7 us against ~20 us per call (docs/architecture.md), and decode calls this once per layer
# per step.
_lib = torch.library.Library("attention", "FRAGMENT")
_lib.define("topk_indices(Tensor scores, int k, Tensor? lengths=None, str? backend=None) -> Tensor")


def _topk_impl(scores, k, lengths=None, backend=None):
    inp = validate_scores(scores, k, backend, lengths)
    return registry.choose_backend(inp).forward(inp)


_lib.impl("topk_indices", _topk_impl, "CompositeExplicitAutograd")


def _register_cuda_kernel() -> None:
    """The CUDA C++ radix select as the op's CUDA kernel, when the extension is built."""
    b = next((x for x in registry.backends("topk_indices") if x.name == "cuda"), None)
    if b is None or b.unavailable_reasons():
        return

    def _cuda(scores, k, lengths=None, backend=None):
        if backend in (None, "cuda") and not os.environ.get("ATTENTION_SELECTION_BACKEND"):
            inp = validate_scores(scores, k, backend, lengths)
            if not b.not_supported_reasons(inp):
                return b.forward(inp)
        return _topk_impl(scores, k, lengths, backend)

    _lib.impl("topk_indices", _cuda, "CUDA")


_register_cuda_kernel()


@torch.library.register_fake("attention::topk_indices")
def _topk_fake(scores, k, lengths=None, backend=None):
    validate_scores(scores, k, backend, lengths)
    return scores.new_empty(scores.shape[0], 1, k, dtype=torch.int32)


# ----------------------------------------------------------------------------- public API
def lightning_indexer(q_idx: Tensor, k_idx: Tensor, weights: Tensor, *, scale: Optional[float] = None,
                      cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                      block_table: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
                      max_seqlen_k: Optional[int] = None, causal: bool = True,
                      q_idx_scale: Optional[Tensor] = None, k_idx_scale: Optional[Tensor] = None,
                      cu_seqlen_ks: Optional[Tensor] = None, cu_seqlen_ke: Optional[Tensor] = None,
                      backend: Optional[str] = None) -> Tensor:
    """DeepSeek-V3.2 index scores [T, W] float32, -inf where the position is not a valid key.

    I[t, s] = sum_j weights[t, j] * relu(scale * q_idx[t, j] . k_idx[s]); scale defaults to Di ** -0.5.
    k_idx is [S, Di] (contiguous, ``cu_seqlens_k``) or [P, page, Di] (paged, ``block_table`` +
    ``seqlens_k``), laid out like ``kv`` in docs/spec.md section 1. W = ``max_seqlen_k`` or the longest
    sequence (a host read on a device: serving code passes ``max_seqlen_k``).

    Quantized inputs (DeepGEMM's ``fp8_mqa_logits``): float8_e4m3fn or int8 ``q_idx`` and ``k_idx``,
    dequantized in the kernel as ``q_idx[t, j] * q_idx_scale[t, j]`` (float32 [T, Hi]; optional, 1 when
    None) and ``k_idx[r] * k_idx_scale[r]`` (float32 ``k_idx.shape[:-1]``, required).
    ``cu_seqlen_ks`` / ``cu_seqlen_ke`` (int [T], both or neither): token t sees only the positions in
    [ks[t], ke[t]) (vLLM's per-row key windows), on top of the length and causal rules.
    """
    inp = validate_selection("lightning_indexer", q_idx, k_idx, weights, scale=scale, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, block_table=block_table, seqlens_k=seqlens_k,
                             max_seqlen_k=max_seqlen_k, causal=causal, q_idx_scale=q_idx_scale,
                             k_idx_scale=k_idx_scale, cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke,
                             backend=backend)
    return registry.choose_backend(inp).forward(inp).to(torch.float32)


def topk_indices(scores: Tensor, k: int, *, lengths: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tensor:
    """[T, W] scores -> [T, 1, k] int32: valid (> -inf) positions by descending score, ties to the lower
    position, then -1. ``lengths`` (int [T], vLLM's ``top_k_per_row`` lengths): row t ranks only its
    positions [0, lengths[t]); a -inf score inside the length is still invalid (docs/selection.md).
    Runs ``torch.ops.attention.topk_indices``."""
    validate_scores(scores, k, backend, lengths)
    return torch.ops.attention.topk_indices(scores, k, lengths, backend)


def block_scores(scores: Tensor, block_size: int, block_reduce: str = "max") -> Tensor:
    """[T, W] position scores -> [T, ceil(W / block_size)] NSA-style block scores ("max" or "mean" over
    each block's valid positions; -inf for a block with none)."""
    validate_scores(scores, 0)
    need_int("block_size", block_size, 1)
    need_choice("block_reduce", block_reduce, BLOCK_REDUCES)
    return python_ref.block_scores(scores, block_size, block_reduce)


def select(q_idx: Tensor, k_idx: Tensor, weights: Tensor, k: int, *, scale: Optional[float] = None,
           cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
           block_table: Optional[Tensor] = None, seqlens_k: Optional[Tensor] = None,
           max_seqlen_k: Optional[int] = None, causal: bool = True, block_size: int = 1,
           block_reduce: str = "max", q_idx_scale: Optional[Tensor] = None, k_idx_scale: Optional[Tensor] = None,
           cu_seqlen_ks: Optional[Tensor] = None, cu_seqlen_ke: Optional[Tensor] = None,
           backend: Optional[str] = None) -> Tensor:
    """Fused indexer + top-k: [T, 1, k] int32, ready for ``selective_attention(indices=...)``.

    Same arguments and order as ``topk_indices(lightning_indexer(...), k)`` but never builds the
    [T, W] score matrix. ``block_size=b > 1`` selects blocks of b positions (block j = positions
    [j*b, j*b + b)) scored by ``block_reduce`` ("max": best position, the default; "mean": mean of
    the valid positions); pass the same ``block_size`` to ``selective_attention``. Quantized inputs
    and key windows as in :func:`lightning_indexer`.
    """
    inp = validate_selection("select", q_idx, k_idx, weights, k, scale=scale, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, block_table=block_table, seqlens_k=seqlens_k,
                             max_seqlen_k=max_seqlen_k, causal=causal, block_size=block_size,
                             block_reduce=block_reduce, q_idx_scale=q_idx_scale, k_idx_scale=k_idx_scale,
                             cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke, backend=backend)
    return registry.choose_backend(inp).forward(inp)
