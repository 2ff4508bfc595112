"""The arguments of ``selective_attention``, declared once.

Everything that needs the op's argument list derives it from ``ARGS``: the torch.library schema
(attention/ops.py), the positional order the dispatcher uses, the defaults filled in for a call that
gave fewer arguments, which arguments get a gradient, which optional tensors are type/device checked
in one pass, the fields of ``SelectiveAttentionInputs`` (attention/inputs.py), and the keyword
arguments handed to the reference (``python_ref.selective_attention``).

Adding an argument (as the quantized cache's ``kv_scale`` was) is one row here, its rules in
``inputs.validate``, its math in python_ref, and each kernel that implements it (docs/architecture.md).
This module imports nothing of the package: every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from torch import Tensor

REQUIRED = object()  # the default of an argument the caller must give


@dataclass(frozen=True)
class Arg:
    name: str
    schema_type: str  # torch.library schema type ("Tensor", "Tensor?", "int", "float?", ...)
    default: Any = REQUIRED
    differentiable: bool = False  # receives a gradient from the op's backward
    sequence: bool = False  # describes the kv layout (sequences, pages), not the math of one row
    math: bool = True  # passed to the reference; False for dispatch-only arguments (backend)
    doc: str = ""
    annotation: Any = None  # type of the field after validation (defaults from schema_type)

    @property
    def optional_tensor(self) -> bool:
        return self.schema_type == "Tensor?"

    def schema(self) -> str:
        if self.default is REQUIRED:
            return f"{self.schema_type} {self.name}"
        return f"{self.schema_type} {self.name}={self.default}"  # None, True/False, 1 print as the schema spells them


ARGS: Tuple[Arg, ...] = (
    Arg("q", "Tensor", differentiable=True, doc="queries [T, H, Dqk]"),
    Arg("kv", "Tensor", differentiable=True,
        doc="keys (and latent values) [S, Hkv, Dqk], or paged [P, page, Hkv, Dqk]"),
    Arg("indices", "Tensor", doc="candidate positions (or blocks) [T, Hkv or 1, K] int32/int64; -1 = none"),
    Arg("v", "Tensor?", None, differentiable=True, doc="separate values, kv's leading shape + [Dv]"),
    Arg("d_v", "int?", None, annotation=int, doc="latent value width (value = kv[..., :d_v]); set after validation"),
    Arg("q_rope", "Tensor?", None, differentiable=True, doc="rope part of the queries [T, H, Dr]"),
    Arg("kv_rope", "Tensor?", None, differentiable=True, doc="rope part of the keys, kv's leading shape + [Dr]"),
    Arg("sm_scale", "float?", None, annotation=float, doc="softmax scale, default (Dqk + Dr) ** -0.5"),
    Arg("block_size", "int", 1, doc="positions per index (NSA blocks)"),
    Arg("cu_seqlens_q", "Tensor?", None, sequence=True, doc="query offsets per sequence [B+1]"),
    Arg("cu_seqlens_k", "Tensor?", None, sequence=True, doc="key offsets per sequence [B+1] (contiguous kv)"),
    Arg("block_table", "Tensor?", None, sequence=True, doc="pages of each sequence [B, max_pages] (paged kv)"),
    Arg("seqlens_k", "Tensor?", None, sequence=True, doc="key length of each sequence [B] (paged kv)"),
    Arg("causal", "bool", False, doc="bottom-right aligned causal mask"),
    Arg("attn_sink", "Tensor?", None, differentiable=True, doc="per-head sink logit [H] (float32 after validation)"),
    # Quantized caches (docs/contract.md "Quantized caches"): a float8_e4m3fn / int8 kv or v carries one
    # float32 scale per row and tile of scale_block columns; value = stored * scale. No gradient reaches
    # a quantized kv or v (they are storage, not parameters).
    Arg("kv_scale", "Tensor?", None,
        doc="float32 tile scales of a quantized kv, kv's leading shape + [ceil(Dqk / scale_block)]"),
    Arg("v_scale", "Tensor?", None,
        doc="float32 tile scales of a quantized v, v's leading shape + [ceil(Dv / scale_block)]"),
    Arg("scale_block", "int", 128, doc="columns per scale of a quantized kv / v"),
    Arg("backend", "str?", None, math=False, doc="force a backend by name"),
)

ARG_NAMES: Tuple[str, ...] = tuple(a.name for a in ARGS)
ARG_INDEX: Dict[str, int] = {n: i for i, n in enumerate(ARG_NAMES)}
NUM_REQUIRED: int = sum(a.default is REQUIRED for a in ARGS)
#: defaults of the arguments after the required ones, in positional order
DEFAULTS: Tuple[Any, ...] = tuple(a.default for a in ARGS[NUM_REQUIRED:])
DIFFERENTIABLE: Tuple[str, ...] = tuple(a.name for a in ARGS if a.differentiable)
OPTIONAL_TENSORS: Tuple[str, ...] = tuple(a.name for a in ARGS if a.optional_tensor)
SEQUENCE_ARGS: Tuple[str, ...] = tuple(a.name for a in ARGS if a.sequence)
#: keyword arguments of python_ref.selective_attention after (q, kv, indices)
REFERENCE_KWARGS: Tuple[str, ...] = tuple(a.name for a in ARGS[NUM_REQUIRED:] if a.math)
SCHEMA: str = "(" + ", ".join(a.schema() for a in ARGS) + ") -> (Tensor, Tensor)"

_ANNOTATIONS = {"Tensor": Tensor, "Tensor?": Optional[Tensor], "int": int, "bool": bool, "str?": Optional[str]}


def annotation(a: Arg):
    return a.annotation if a.annotation is not None else _ANNOTATIONS[a.schema_type]


def bind(args: tuple, kwargs: Optional[dict]) -> tuple:
    """Positional and keyword arguments of one call -> every argument in table order.

    The hot path (the API or the dispatcher handing them positionally) is one tuple concatenation.
    """
    n = len(args)
    if not kwargs and NUM_REQUIRED <= n <= len(ARGS):
        # every argument positional (the API), or the leading ones (the dispatcher leaves out trailing
        # defaults): the table's defaults complete them
        return args + DEFAULTS[n - NUM_REQUIRED:]
    if n < NUM_REQUIRED and not kwargs:
        raise TypeError(f"selective_attention needs {', '.join(ARG_NAMES[:NUM_REQUIRED])}; got {n} arguments")
    if n > len(ARGS):
        raise TypeError(f"selective_attention takes at most {len(ARGS)} arguments, got {n}")
    full = list(args) + [REQUIRED] * (NUM_REQUIRED - n) + list(DEFAULTS[max(0, n - NUM_REQUIRED):])
    for k, v in (kwargs or {}).items():
        i = ARG_INDEX.get(k)
        if i is None:
            raise TypeError(f"selective_attention got an unexpected keyword argument {k!r}")
        if i < n:
            raise TypeError(f"selective_attention got multiple values for argument {k!r}")
        full[i] = v
    for i in range(NUM_REQUIRED):
        if full[i] is REQUIRED:
            raise TypeError(f"selective_attention missing required argument {ARG_NAMES[i]!r}")
    return tuple(full)
