"""One validated inputs object per call (docs/style.md rule 4: validate once, up front; kernels trust it).

Every shape, dtype, device and range rule of docs/spec.md section 1 is checked here, before any kernel
runs, and raises ``ValueError``/``TypeError`` naming the argument. Rules on tensor *contents*
(monotone ``cu_seqlens_*``, table entries inside the cache, ``seqlens_k`` within the table) cost a
device sync on a GPU/NPU, so they are checked always for CPU tensors and elsewhere only with
``ATTENTION_DEBUG=1``; device kernels mask anything out of range regardless.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import os
from dataclasses import dataclass, field, make_dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .arguments import ARGS, NUM_REQUIRED, OPTIONAL_TENSORS, REFERENCE_KWARGS, annotation, bind

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
#: Storage dtypes of a quantized kv / v (with kv_scale / v_scale) -> the registry feature they need.
QUANT_DTYPES = {torch.float8_e4m3fn: "kv_fp8", torch.int8: "kv_int8"}


_reference_values = operator.attrgetter(*REFERENCE_KWARGS)


class _Derived:
    """Sizes and features derived from the validated arguments (the fields come from ``ARGS``)."""

    op = "attention"
    #: environment variable that forces a backend for this op (the ``backend`` argument wins)
    force_env = "ATTENTION_BACKEND"

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
    def heads_per_kv(self) -> int:
        """Query heads that share one kv head (H / Hkv; the Triton kernels' ``HG``, AscendC's ``headsPerKv``)."""
        return self.q.shape[1] // self.kv.shape[-2]

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
        """Named features these inputs use (``registry.ATTENTION_FEATURES``); backends declare theirs."""
        return _features_of(self._feature_flags())

    def _feature_flags(self) -> tuple:
        # Everything `features` depends on, as a cheap hashable tuple (the registry's cache key). bool():
        # while tracing with dynamic shapes the size tests are symbolic; features are decided concretely.
        cu_q, v = self.cu_seqlens_q, self.v
        return (v is None, self.kv.dim() == 4, self.q_rope is not None, self.block_size > 1, self.causal,
                self.attn_sink is not None, cu_q is not None and bool(cu_q.shape[0] > 2),
                bool(self.indices.shape[1] == 1 and self.kv.shape[-2] > 1),
                self.kv.dtype, None if v is None else v.dtype)

    @property
    def kv_quantized(self) -> bool:
        """kv is stored quantized (float8_e4m3fn / int8, with ``kv_scale``)."""
        return self.kv_scale is not None

    @property
    def v_quantized(self) -> bool:
        """A separate v is stored quantized (with ``v_scale``)."""
        return self.v_scale is not None

    @property
    def sizes(self) -> tuple:
        """(T, H, Hkv, Dqk, Dr, Dv, K, block_size): every size a backend's declared limits may read."""
        T, H, Dqk = self.q.shape
        return (T, H, self.kv.shape[-2], Dqk, 0 if self.q_rope is None else self.q_rope.shape[-1], self.d_v,
                self.indices.shape[2], self.block_size)

    def choice_key(self) -> tuple:
        """What the registry's cached choice depends on: device, dtype, features, sizes. The device
        itself rather than its type (which builds a string on every read): a key finer than the choice
        needs only costs one entry per device."""
        return (self.q.device, self.q.dtype, self._feature_flags(), self.sizes)

    def reference_kwargs(self) -> dict:
        """Keyword arguments for ``python_ref.selective_attention`` and its backward: the math arguments
        after indices that are set. One left out is None here, and None is the reference's default too;
        leaving it out makes the decode call's hand-off a few keywords rather than sixteen."""
        return {k: x for k, x in zip(REFERENCE_KWARGS, _reference_values(self)) if x is not None}

    def describe(self) -> str:
        return (f"T={self.num_tokens} H={self.num_heads} Hkv={self.num_kv_heads} Dqk={self.head_dim} "
                f"Dv={self.d_v} Dr={self.rope_dim} K={self.topk} block={self.block_size} "
                f"dtype={dtype_name(self.dtype)} {'paged' if self.paged else 'contiguous'}"
                + "".join(f" {n}={dtype_name(x.dtype)}" for n, x in (("kv", self.kv), ("v", self.v))
                          if x is not None and x.dtype in QUANT_DTYPES))


@functools.lru_cache(maxsize=None)
def _features_of(flags: tuple) -> frozenset:
    latent, paged, rope, block, causal, sink, varlen, shared, kv_dtype, v_dtype = flags
    named = (("rope", rope), ("block", block), ("causal", causal), ("sink", sink), ("varlen", varlen),
             ("shared_indices", shared))
    quantized = [QUANT_DTYPES[d] for d in (kv_dtype, v_dtype) if d in QUANT_DTYPES]  # kv_fp8 / kv_int8
    return frozenset([("latent" if latent else "separate_v"), ("paged" if paged else "contiguous")]
                     + [name for name, on in named if on] + quantized)


# The inputs object: one field per row of ARGS, in the schema's order, with the derived sizes above.
SelectiveAttentionInputs = make_dataclass(
    "SelectiveAttentionInputs",
    [(x.name, annotation(x)) if i < NUM_REQUIRED else (x.name, annotation(x), field(default=x.default))
     for i, x in enumerate(ARGS)],
    bases=(_Derived,))
SelectiveAttentionInputs.__module__ = __name__  # (make_dataclass's module= needs Python 3.12)
SelectiveAttentionInputs.__doc__ = "Arguments of ``selective_attention`` after validation, plus derived sizes."


def env_value(name: str) -> str:
    """``os.environ.get(name, "")``, without its cost when the variable is absent.

    The op reads its switches (``ATTENTION_BACKEND``, ``ATTENTION_NAN_FILL``, ``ATTENTION_DEBUG``) on
    every call, so that a change made while the process runs takes effect. ``os.environ.get`` raises and
    catches two KeyErrors for an absent name: ~2 us alone and ~7 us of a tiny decode call measured in
    place (docs/architecture.md). CPython's ``os.environ`` keeps its contents in a dict (``_data``, keys
    encoded by its ``encodekey``) that every write through ``os.environ`` updates (``putenv`` too), so
    that dict is read directly; anything else standing in for ``os.environ`` (a test's plain dict,
    another Python) is read with ``get``. tests/test_op.py checks both against ``os.environ.get``.
    """
    env = os.environ
    data = getattr(env, "_data", None)
    if type(data) is not dict:
        return env.get(name, "")
    key = _env_keys.get(name)
    if key is None:
        key = _env_keys[name] = env.encodekey(name)
    value = data.get(key)
    return "" if value is None else env.decodevalue(value)


_env_keys: dict = {}


def debug_checks_enabled() -> bool:
    return env_value("ATTENTION_DEBUG") not in ("", "0", "false", "False")


def dtype_name(x) -> str:
    """torch.bfloat16 -> "bfloat16" (error messages, reports, tuning keys)."""
    return str(x).replace("torch.", "")


_FLOAT32_MAX = torch.finfo(torch.float32).max


def finite_float(name: str, x) -> float:
    """A Python float from an int/float argument that is finite *in float32* (negative allowed), else
    TypeError/ValueError. Every backend computes in float32 (docs/spec.md section 1), so 1e300 would become
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


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): tile sizes, since tl.arange needs one."""
    return 1 << max(0, int(n) - 1).bit_length()


def nan_fill_enabled() -> bool:
    return env_value("ATTENTION_NAN_FILL") not in ("", "0")


def new_empty(*shape, device, dtype) -> Tensor:
    """An output buffer for a kernel to write. With ATTENTION_NAN_FILL=1 (the test suite and verify set
    it) it is filled with NaN (float) or -2 (int, a value no index output holds), so an element a
    kernel forgets cannot pass a comparison; uninitialised otherwise."""
    if nan_fill_enabled():
        return torch.full(shape, float("nan") if dtype.is_floating_point else -2, device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def new_outputs(inp) -> Tuple[Tensor, Tensor]:
    """(out [T, H, Dv] q.dtype, lse [T, H] float32) of the attention op, for a kernel to write into."""
    T, H = inp.num_tokens, inp.num_heads
    return (new_empty(T, H, inp.d_v, device=inp.device, dtype=inp.dtype),
            new_empty(T, H, device=inp.device, dtype=torch.float32))


# ---- argument checks shared by every entry point (the op, the selection ops, the vendor shims) ----
def need_tensor(name: str, x, optional: bool = False) -> None:
    if x is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def need_rank(name: str, x: Tensor, ranks, what: str) -> None:
    """``ranks``: one rank or a tuple of allowed ranks; ``what`` names the layout ("[T, H, D]")."""
    if x.dim() not in ((ranks,) if isinstance(ranks, int) else ranks):
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")


def need_int_tensor(name: str, x, rank: int, what: str) -> None:
    need_tensor(name, x)
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {dtype_name(x.dtype)}")
    need_rank(name, x, rank, what)


def need_int(name: str, x, lo: int = 0) -> None:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")


def need_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def need_backend_name(backend) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")


def is_fake(x: Tensor) -> bool:
    # FakeTensor / meta tensors carry no data: content checks are skipped for them.
    return x.is_meta or type(x).__name__ in ("FakeTensor", "FunctionalTensor")


def validate(*args, check_contents: Optional[bool] = None, **kwargs) -> SelectiveAttentionInputs:
    """Check every rule of docs/spec.md section 1 and return the inputs object.

    Takes the arguments of ``selective_attention`` (see ``attention.arguments.ARGS``: q, kv and indices,
    the rest positionally in the schema's order or by keyword). ``check_contents`` reads the sequence
    metadata on the host: default on for CPU tensors (free) and elsewhere only with ATTENTION_DEBUG=1.
    """
    inp = SelectiveAttentionInputs(*bind(args, kwargs))
    _check_tensor_types(inp)
    key_width = _check_shapes(inp)
    _check_scalars(inp, key_width)
    _check_quantization(inp)
    layout = inp.layout = KVLayout.check(inp.kv.dim() == 4, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.block_table,
                                         inp.seqlens_k)
    if not layout.trivial:  # one contiguous sequence has no contents to check
        if check_contents is None:
            check_contents = inp.q.is_cpu or debug_checks_enabled()
        if check_contents and not is_fake(inp.q):
            check_sequence_contents(inp)
    return inp


validate.__signature__ = inspect.Signature(
    [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                       **({} if i < NUM_REQUIRED else {"default": a.default}))
     for i, a in enumerate(ARGS)]
    + [inspect.Parameter("check_contents", inspect.Parameter.KEYWORD_ONLY, default=None)])


def _check_tensor_types(inp) -> None:
    """Tensors are tensors, on q's device, with the dtypes docs/spec.md section 1 allows."""
    q, kv, indices = inp.q, inp.kv, inp.indices
    need_tensor("q", q)
    need_tensor("kv", kv)
    need_tensor("indices", indices)
    # The optional tensors in one C-level read: a decode call usually has none, and then the loop (type,
    # then device, of each one given) and the dtype rules of v and the rope pair are skipped whole.
    optional = _optional_tensors(inp)
    given = optional.count(None) != len(optional)
    dev = q.device
    if given:
        for name, x in zip(OPTIONAL_TENSORS, optional):
            if x is not None:
                need_tensor(name, x)
                if x.device != dev:
                    raise ValueError(f"{name} must be on q's device {dev}, got {x.device}")
    dtype = q.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {dtype_name(dtype)}")
    _need_dtype_of_q("kv", kv, dtype, quantizable=True)
    if given:
        _need_dtype_of_q("v", inp.v, dtype, quantizable=True)
        _need_dtype_of_q("q_rope", inp.q_rope, dtype, quantizable=False)
        _need_dtype_of_q("kv_rope", inp.kv_rope, dtype, quantizable=False)
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int32 or int64, got {dtype_name(indices.dtype)}")
    if kv.device != dev:
        raise ValueError(f"kv must be on q's device {dev}, got {kv.device}")
    if indices.device != dev:
        raise ValueError(f"indices must be on q's device {dev}, got {indices.device}")


_optional_tensors = operator.attrgetter(*OPTIONAL_TENSORS)


def _need_dtype_of_q(name: str, x, dtype: torch.dtype, quantizable: bool) -> None:
    """x (if given) has q's dtype; kv and v may also be stored quantized (scales: _check_quantization)."""
    if x is not None and x.dtype != dtype and not (quantizable and x.dtype in QUANT_DTYPES):
        also = " (or float8_e4m3fn / int8 with a scale)" if quantizable else ""
        raise TypeError(f"{name} must have q's dtype {dtype_name(dtype)}{also}, got {dtype_name(x.dtype)}")


def _check_shapes(inp) -> int:
    """Shapes of q, kv, v (or the latent d_v), the rope pair and indices. Sets ``inp.d_v``; returns the key
    width Dqk + Dr (the default sm_scale's)."""
    q, kv, v, d_v, indices = inp.q, inp.kv, inp.v, inp.d_v, inp.indices
    # (each .shape read builds a torch.Size: read once per tensor, since a decode call is this cheap)
    need_rank("q", q, (3,), "[T, H, Dqk]")
    T, H, Dqk = q_shape = q.shape
    need_rank("kv", kv, (3, 4), "[S, Hkv, Dqk] or paged [P, page, Hkv, Dqk]")
    kv_shape = kv.shape
    Hkv = kv_shape[-2]
    if Hkv < 1:
        raise ValueError(f"kv must have at least one kv head, got shape {tuple(kv_shape)}")
    if H < 1 or Dqk < 1:
        raise ValueError(f"q must have H >= 1 and Dqk >= 1, got shape {tuple(q_shape)}")
    if H % Hkv != 0:
        raise ValueError(f"q's head count H={H} must be a multiple of kv's head count Hkv={Hkv}")
    if kv_shape[-1] != Dqk:
        raise ValueError(f"kv's last dimension must equal q's head width Dqk={Dqk}, got {kv_shape[-1]}")
    if len(kv_shape) == 4 and kv_shape[1] < 1:
        raise ValueError(f"kv's page size must be >= 1, got shape {tuple(kv_shape)}")

    # kv's leading shape (S, Hkv) or (P, page, Hkv): built only when v or the rope pair must match it
    lead = tuple(kv_shape[:-1]) if v is not None or inp.kv_rope is not None else None
    if v is not None:
        if v.dim() != kv.dim() or tuple(v.shape[:-1]) != lead:
            raise ValueError(f"v must have kv's leading shape {lead + ('Dv',)}, got {tuple(v.shape)}")
        if v.shape[-1] < 1:
            raise ValueError(f"v must have a value width >= 1, got shape {tuple(v.shape)}")
        if d_v is not None and int(d_v) != v.shape[-1]:
            raise ValueError(f"d_v must be None or v's width {v.shape[-1]} when v is given, got {d_v}")
        inp.d_v = v.shape[-1]
    elif d_v is None:
        inp.d_v = Dqk
    else:
        if isinstance(d_v, bool) or not isinstance(d_v, int):
            raise TypeError(f"d_v must be an int, got {type(d_v).__name__}")
        if not 1 <= d_v <= Dqk:
            raise ValueError(f"d_v must be in [1, Dqk={Dqk}] in latent mode (value = kv[..., :d_v]), got {d_v}")

    q_rope, kv_rope = inp.q_rope, inp.kv_rope
    if (q_rope is None) != (kv_rope is None):
        given = "q_rope" if q_rope is not None else "kv_rope"
        missing = "kv_rope" if q_rope is not None else "q_rope"
        raise ValueError(f"{missing} must be given together with {given} (both or neither)")
    Dr = 0
    if q_rope is not None:
        need_rank("q_rope", q_rope, (3,), "[T, H, Dr]")
        if tuple(q_rope.shape[:2]) != (T, H):
            raise ValueError(f"q_rope must have q's leading shape ({T}, {H}, Dr), got {tuple(q_rope.shape)}")
        Dr = q_rope.shape[2]
        if kv_rope.dim() != kv.dim() or tuple(kv_rope.shape[:-1]) != lead or kv_rope.shape[-1] != Dr:
            raise ValueError(f"kv_rope must have shape {lead + (Dr,)} (kv's leading shape, q_rope's width), "
                             f"got {tuple(kv_rope.shape)}")

    need_rank("indices", indices, (3,), "[T, Hkv, K] (or [T, 1, K])")
    index_shape = indices.shape
    if index_shape[0] != T:
        raise ValueError(f"indices must have T={T} rows (one per query token), got shape {tuple(index_shape)}")
    if index_shape[1] != Hkv and index_shape[1] != 1:
        raise ValueError(f"indices' middle dimension must be Hkv={Hkv} or 1, got shape {tuple(index_shape)}")
    return Dqk + Dr


def _check_scalars(inp, key_width: int) -> None:
    """block_size, sm_scale (default filled in), causal, backend, attn_sink (made float32)."""
    block_size = inp.block_size
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    inp.sm_scale = key_width ** -0.5 if inp.sm_scale is None else finite_float("sm_scale", inp.sm_scale)
    if not isinstance(inp.causal, bool):
        raise TypeError(f"causal must be a bool, got {type(inp.causal).__name__}")
    need_backend_name(inp.backend)
    sink = inp.attn_sink
    if sink is not None:
        if not sink.is_floating_point():
            raise TypeError(f"attn_sink must be a float tensor, got {dtype_name(sink.dtype)}")
        H = inp.q.shape[1]
        if sink.dim() != 1 or sink.shape[0] != H:
            raise ValueError(f"attn_sink must have shape [H]=({H},), got {tuple(sink.shape)}")
        if sink.dtype != torch.float32:
            inp.attn_sink = sink.to(torch.float32)


def _check_quantization(inp) -> None:
    """A quantized kv / v (float8_e4m3fn, int8) and its float32 tile scales (docs/contract.md).

    The scale of a quantized tensor x is required, float32, of shape x.shape[:-1] + (ceil(D /
    scale_block),), any strides; a float x takes none. Runs after _check_shapes, so kv, v are shaped.
    """
    sb = inp.scale_block
    if isinstance(sb, bool) or not isinstance(sb, int):
        raise TypeError(f"scale_block must be an int, got {type(sb).__name__}")
    if sb < 1:
        raise ValueError(f"scale_block must be >= 1, got {sb}")
    kv, v, kv_scale, v_scale = inp.kv, inp.v, inp.kv_scale, inp.v_scale
    if (kv_scale is None and v_scale is None and kv.dtype not in QUANT_DTYPES
            and (v is None or v.dtype not in QUANT_DTYPES)):
        return  # a float cache without scales: nothing below applies
    for name, x, scale_name, scale in (("kv", kv, "kv_scale", kv_scale), ("v", v, "v_scale", v_scale)):
        if x is None:
            if scale is not None:
                raise ValueError(f"{scale_name} is the scale of a quantized {name}, but {name} is None")
            continue
        if x.dtype not in QUANT_DTYPES:
            if scale is not None:
                raise ValueError(f"{scale_name} is only for a quantized {name} (float8_e4m3fn or int8); "
                                 f"{name} is {dtype_name(x.dtype)}")
            continue
        want = tuple(x.shape[:-1]) + (-(-x.shape[-1] // sb),)
        if scale is None:
            raise ValueError(f"{scale_name} is required with a quantized {name} ({dtype_name(x.dtype)}): float32 of "
                             f"shape {want} ({name}'s leading shape + ceil(D / scale_block={sb}))")
        if scale.dtype != torch.float32:
            raise TypeError(f"{scale_name} must be float32, got {dtype_name(scale.dtype)}")
        if tuple(scale.shape) != want:
            raise ValueError(f"{scale_name} must have shape {want} ({name}'s leading shape + ceil(D / "
                             f"scale_block={sb})), got {tuple(scale.shape)}")


@dataclass(frozen=True)
class KVLayout:
    """How a kv-like cache (the attention's kv, the indexer's k_idx) holds its sequences, one object for
    every op over such a cache: contiguous rows split by ``cu_seqlens_k``, or pages through
    ``block_table`` + ``seqlens_k``; the queries split by ``cu_seqlens_q``. The public API keeps these
    as flat keywords; ``check`` validates them once and ``kwargs()`` hands them on flat again.
    """

    paged: bool
    cu_seqlens_q: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    block_table: Optional[Tensor] = None
    seqlens_k: Optional[Tensor] = None
    max_seqlen_k: Optional[int] = None  # selection ops: the width of the score matrix
    num_seqs: int = 1

    @classmethod
    def check(cls, paged: bool, cu_seqlens_q=None, cu_seqlens_k=None, block_table=None, seqlens_k=None,
              max_seqlen_k=None, *, cache: str = "kv", paged_shape: str = "[P, page, Hkv, Dqk]",
              contiguous_shape: str = "[S, Hkv, Dqk]") -> "KVLayout":
        """Shape rules of the sequence arguments (no host reads); errors name the argument."""
        if not paged and cu_seqlens_q is None and cu_seqlens_k is None and block_table is None \
                and seqlens_k is None and max_seqlen_k is None:
            return _ONE_CONTIGUOUS_SEQUENCE  # the decode hot path
        if max_seqlen_k is not None:
            need_int("max_seqlen_k", max_seqlen_k)
        if cu_seqlens_q is not None:
            need_int_tensor("cu_seqlens_q", cu_seqlens_q, 1, "[B+1]")
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
            need_int_tensor("block_table", block_table, 2, "[B, max_pages]")
            need_int_tensor("seqlens_k", seqlens_k, 1, "[B]")
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
                need_int_tensor("cu_seqlens_k", cu_seqlens_k, 1, "[B+1]")
                if cu_seqlens_k.shape[0] != B + 1:
                    raise ValueError(f"cu_seqlens_k must have B+1={B + 1} entries like cu_seqlens_q{where}, "
                                     f"got shape {tuple(cu_seqlens_k.shape)}")
            elif B != 1:
                raise ValueError(f"cu_seqlens_k is required with a contiguous {cache} when cu_seqlens_q describes "
                                 f"B={B} sequences (the default [0, S] describes one)")
        return cls(paged, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k, max_seqlen_k, B)

    @property
    def trivial(self) -> bool:
        """One contiguous sequence without metadata: nothing to read on the host."""
        return self.cu_seqlens_q is None and self.cu_seqlens_k is None and not self.paged

    def kwargs(self) -> dict:
        """The flat keyword arguments that are set (``max_seqlen_k``, the selection ops' own, aside)."""
        kw = dict(cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k, block_table=self.block_table,
                  seqlens_k=self.seqlens_k)
        return {k: v for k, v in kw.items() if v is not None}

    def check_values(self, T: int, cache_tensor: Tensor, *, cache: str) -> Tensor:
        """The content rules (reads the small metadata tensors on the host: a sync on a device).

        Returns the per-sequence key lengths (int64, on the CPU).
        """
        lens = self._check_lengths(T, cache_tensor, cache)
        if self.max_seqlen_k is not None and lens.numel() and int(lens.max()) > self.max_seqlen_k:
            raise ValueError(f"max_seqlen_k must be at least the longest sequence {int(lens.max())}, "
                             f"got {self.max_seqlen_k}")
        return lens

    def _check_lengths(self, T: int, cache_tensor: Tensor, cache: str) -> Tensor:
        if self.cu_seqlens_q is not None:
            cq = self.cu_seqlens_q.detach().cpu().to(torch.int64)
            if cq[0].item() != 0 or cq[-1].item() != T:
                raise ValueError(f"cu_seqlens_q must start at 0 and end at T={T}, got {cq.tolist()}")
            if bool((cq[1:] < cq[:-1]).any()):
                raise ValueError(f"cu_seqlens_q must be non-decreasing, got {cq.tolist()}")
        if not self.paged:
            S = cache_tensor.shape[0]
            if self.cu_seqlens_k is None:
                return torch.tensor([S])
            ck = self.cu_seqlens_k.detach().cpu().to(torch.int64)
            if ck[0].item() != 0 or ck[-1].item() > S:
                raise ValueError(f"cu_seqlens_k must start at 0 and end at or below S={S}, got {ck.tolist()}")
            if bool((ck[1:] < ck[:-1]).any()):
                raise ValueError(f"cu_seqlens_k must be non-decreasing, got {ck.tolist()}")
            return ck[1:] - ck[:-1]
        P, page = cache_tensor.shape[0], cache_tensor.shape[1]
        table = self.block_table.detach().cpu().to(torch.int64)
        lens = self.seqlens_k.detach().cpu().to(torch.int64)
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


_ONE_CONTIGUOUS_SEQUENCE = KVLayout(paged=False)


def check_sequence_contents(inp: SelectiveAttentionInputs) -> None:
    """Content rules of the attention op's sequence arguments (skipped for one contiguous sequence)."""
    if not inp.layout.trivial:
        inp.layout.check_values(inp.num_tokens, inp.kv, cache="the cache")
