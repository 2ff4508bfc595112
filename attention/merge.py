"""``merge_attention_states``: exact combination of partial results (docs/spec.md section 6).

    lse = log sum_i exp(lse_i);  out = sum_i exp(lse_i) out_i / (exp(lse) + exp(sink) if sink else exp(lse))

Used by the context-parallel path (attention/distributed.py: one part per rank) and meant for the
split-K combine of the Triton forward (one part per split; same tile function). Also reachable as
``torch.ops.attention.merge_attention_states(outs, lses, attn_sink=None, backend=None) -> (out, lse)``
with a fake kernel (torch.compile, opcheck).

Which implementation runs is the registry's choice for the op ``merge`` (attention/registry.py), as
for every other op: backends declare it in their ``ops`` (``reference`` on any device; ``triton`` on
cuda, and on CPU tensors under TRITON_INTERPRET=1 when forced with ``backend="triton"``, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import registry
from .inputs import FLOAT_DTYPES, dtype_name, need_backend_name, need_rank, need_tensor

__all__ = ["merge_attention_states", "validate_merge", "MergeInputs", "choose_merge_backend"]


# ----------------------------------------------------------------------------- validation
def validate_merge(outs, lses, attn_sink=None, backend=None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Shape/dtype/device rules; returns (outs [N, T, H, Dv], lses [N, T, H], attn_sink [H] float32 or None).

    Sequences of per-part tensors are stacked here (one copy); a stacked tensor is used as it is,
    strides included.
    """
    outs = _stack("outs", outs)
    lses = _stack("lses", lses)
    if outs.dtype not in FLOAT_DTYPES:
        raise TypeError(f"outs must be float32, float16 or bfloat16, got {dtype_name(outs.dtype)}")
    if lses.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lses must be a float tensor (float32), got {dtype_name(lses.dtype)}")
    need_rank("outs", outs, (4,), "[N, T, H, Dv] (N parts)")
    need_rank("lses", lses, (3,), "[N, T, H]")
    if tuple(lses.shape) != tuple(outs.shape[:3]):
        raise ValueError(f"lses must have shape [N, T, H]={tuple(outs.shape[:3])} (outs' first three "
                         f"dimensions), got {tuple(lses.shape)}")
    dev = outs.device
    if lses.device != dev:
        raise ValueError(f"lses must be on outs' device {dev}, got {lses.device}")
    if attn_sink is not None:
        need_tensor("attn_sink", attn_sink)
        if not attn_sink.is_floating_point():
            raise TypeError(f"attn_sink must be a float tensor, got {dtype_name(attn_sink.dtype)}")
        H = outs.shape[2]
        if attn_sink.dim() != 1 or attn_sink.shape[0] != H:
            raise ValueError(f"attn_sink must have shape [H]=({H},), got {tuple(attn_sink.shape)}")
        if attn_sink.device != dev:
            raise ValueError(f"attn_sink must be on outs' device {dev}, got {attn_sink.device}")
        attn_sink = attn_sink.to(torch.float32)  # another float dtype is converted (as in the op)
    need_backend_name(backend)
    return outs, lses, attn_sink


def _stack(name: str, x) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a torch.Tensor or a list/tuple of tensors, got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name} must hold at least one part (pass a stacked tensor with N=0 for none)")
    for i, t in enumerate(x):
        need_tensor(f"{name}[{i}]", t)
        if t.shape != x[0].shape or t.dtype != x[0].dtype or t.device != x[0].device:
            raise ValueError(f"{name}[{i}] must match {name}[0]'s shape {tuple(x[0].shape)}, dtype "
                             f"{dtype_name(x[0].dtype)} and device {x[0].device}; got {tuple(t.shape)}, "
                             f"{dtype_name(t.dtype)}, {t.device}")
    return torch.stack(list(x))


# ----------------------------------------------------------------------------- registry inputs
@dataclass
class MergeInputs:
    """Validated arguments of one merge, as the registry and the backends read them (op ``merge``)."""

    outs: Tensor  # [N, T, H, Dv]
    lses: Tensor  # [N, T, H]
    attn_sink: Optional[Tensor] = None  # [H] float32
    backend: Optional[str] = None

    op = "merge"
    #: no environment variable forces the merge (ATTENTION_BACKEND names an attention backend)
    force_env = None
    features = frozenset()  # a merge has no optional feature for a backend to declare

    @property
    def device(self) -> torch.device:
        return self.outs.device

    @property
    def dtype(self) -> torch.dtype:
        return self.outs.dtype

    def choice_key(self) -> tuple:
        return (self.outs.device.type, self.outs.dtype)

    def describe(self) -> str:
        return f"merge outs={tuple(self.outs.shape)} {dtype_name(self.outs.dtype)}"


def choose_merge_backend(inp: MergeInputs):
    """The registered backend that merges these inputs (``backend=`` forces one)."""
    return registry.choose_backend(inp)


# ----------------------------------------------------------------------------- torch.library op
# A FRAGMENT of the "attention" namespace. define/impl rather than @custom_op: ~7 us against ~20 us
# of dispatch per call (docs/traps.md); the context-parallel decode merges once per layer per step.
_lib = torch.library.Library("attention", "FRAGMENT")
_lib.define("merge_attention_states(Tensor outs, Tensor lses, Tensor? attn_sink=None, str? backend=None) "
            "-> (Tensor, Tensor)")


def _impl(outs, lses, attn_sink=None, backend=None):
    inp = MergeInputs(*validate_merge(outs, lses, attn_sink, backend), backend)
    return choose_merge_backend(inp).forward(inp)


_lib.impl("merge_attention_states", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("attention::merge_attention_states")
def _fake(outs, lses, attn_sink=None, backend=None):
    outs, lses, attn_sink = validate_merge(outs, lses, attn_sink, backend)
    N, T, H, Dv = outs.shape
    return outs.new_empty(T, H, Dv), outs.new_empty(T, H, dtype=torch.float32)


def merge_attention_states(outs: Union[Tensor, Sequence[Tensor]], lses: Union[Tensor, Sequence[Tensor]], *,
                           attn_sink: Optional[Tensor] = None,
                           backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Merge partial results over disjoint candidate sets of the same queries (docs/spec.md section 6).

    outs: [N, T, H, Dv] or a list of N [T, H, Dv] partial outputs (each normalised over its own
    candidates, computed without sink); lses: [N, T, H] or a list of [T, H] natural-log LSEs (-inf
    for an empty part); attn_sink: [H] per-head sink logit, applied once here. Returns (out [T, H, Dv]
    in outs' dtype, lse [T, H] float32). All parts empty: out 0, lse -inf.
    """
    outs, lses, attn_sink = validate_merge(outs, lses, attn_sink, backend)
    return torch.ops.attention.merge_attention_states(outs, lses, attn_sink, backend)
