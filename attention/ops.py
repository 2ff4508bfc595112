"""``torch.ops.attention.selective_attention``: the torch.library op, its fake kernel and autograd.

The schema is defined once here. Its one implementation validates the arguments into a
``SelectiveAttentionInputs`` and hands them to the backend the registry chooses for the inputs'
device (cpu -> reference; cuda -> triton; npu -> ascendc; each falls back to the reference), so
"per-device kernels" are registry entries rather than ``if device ==`` chains. The fake kernel
checks shapes with the same validator, so ``torch.compile(fullgraph=True)`` sees the same errors.
The backward is the reference's analytical backward (python_ref.selective_attention_backward), which
recomputes the scores chunk by chunk on whatever device the tensors live: training through the op
works on every device today.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

import python_ref

from . import registry
from .inputs import SelectiveAttentionInputs, validate, validate_positional  # noqa: F401

SCHEMA = (
    "(Tensor q, Tensor kv, Tensor indices, Tensor? v=None, int? d_v=None, Tensor? q_rope=None, "
    "Tensor? kv_rope=None, float? sm_scale=None, int block_size=1, Tensor? cu_seqlens_q=None, "
    "Tensor? cu_seqlens_k=None, Tensor? block_table=None, Tensor? seqlens_k=None, bool causal=False, "
    "Tensor? attn_sink=None, str? backend=None) -> (Tensor, Tensor)"
)

ARG_NAMES = ("q", "kv", "indices", "v", "d_v", "q_rope", "kv_rope", "sm_scale", "block_size", "cu_seqlens_q",
             "cu_seqlens_k", "block_table", "seqlens_k", "causal", "attn_sink", "backend")


def run_backend(inp: SelectiveAttentionInputs) -> Tuple[Tensor, Tensor]:
    """Run the backend the registry chooses (unknown or unfit forced names raise ValueError)."""
    return registry.choose_backend(inp).forward(inp)


# Defined with torch.library.Library rather than @custom_op: on our 2-core CPUs custom_op's Python
# wrapper costs ~50 us per call against ~7 us for a plain define/impl, and decode loops call this
# op once per layer per step (measured by bench/dispatch_overhead.py). Fake kernel, autograd and
# opcheck work the same way through torch.library.register_fake / register_autograd.
_lib = torch.library.Library("attention", "DEF")
_lib.define("selective_attention" + SCHEMA)


# Schema defaults of the arguments after (q, kv, indices): the dispatcher hands a Python kernel only
# the arguments the caller gave.
_DEFAULTS = (None, None, None, None, None, 1, None, None, None, None, False, None, None)


def _validated(args: tuple, kwargs=None, check_contents=None) -> SelectiveAttentionInputs:
    """The schema's arguments -> one validated inputs object."""
    if len(args) != len(ARG_NAMES) or kwargs:
        full = list(args) + list(_DEFAULTS[len(args) - 3:])
        for k, v in (kwargs or {}).items():
            full[ARG_NAMES.index(k)] = v
        args = full
    return validate_positional(*args, check_contents=check_contents)


def _impl(*args, **kwargs):
    return run_backend(_validated(args, kwargs))


# One implementation for every device: the registry picks the backend from the inputs' device.
_lib.impl("selective_attention", _impl, "CompositeExplicitAutograd")

selective_attention_op = torch.ops.attention.selective_attention.default


@torch.library.register_fake("attention::selective_attention")
def _fake(*args, **kwargs):
    inp = _validated(args, kwargs, check_contents=False)  # same shape/dtype errors at trace time
    q = inp.q
    return q.new_empty(q.shape[0], q.shape[1], inp.d_v), q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)


# ---------------------------------------------------------------- autograd
_DIFFERENTIABLE = ("q", "kv", "v", "q_rope", "kv_rope", "attn_sink")


def _setup_context(ctx, inputs: Sequence, output):
    args = dict(zip(ARG_NAMES, inputs))
    saved = [args[n] for n in _DIFFERENTIABLE] + [args["indices"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                                                  args["block_table"], args["seqlens_k"]]
    ctx.save_for_backward(*saved)
    ctx.d_v = args["d_v"]
    ctx.sm_scale = args["sm_scale"]
    ctx.block_size = args["block_size"]
    ctx.causal = args["causal"]


def _backward(ctx, grad_out, grad_lse):
    q, kv, v, q_rope, kv_rope, attn_sink, indices, cu_q, cu_k, table, seqlens = ctx.saved_tensors
    grads = python_ref.selective_attention_backward(
        grad_out, grad_lse, q, kv, indices, v=v, d_v=ctx.d_v, q_rope=q_rope, kv_rope=kv_rope,
        sm_scale=ctx.sm_scale, block_size=ctx.block_size, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        block_table=table, seqlens_k=seqlens, causal=ctx.causal, attn_sink=attn_sink)
    g = dict(zip(_DIFFERENTIABLE, grads))
    return tuple(g.get(n) for n in ARG_NAMES)


torch.library.register_autograd("attention::selective_attention", _backward, setup_context=_setup_context)
