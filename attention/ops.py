"""``torch.ops.attention.selective_attention``: the torch.library op, its fake kernel and autograd.

The schema comes from the argument table (attention/arguments.py). The op's one implementation
validates the arguments into a ``SelectiveAttentionInputs`` and hands them to the backend the registry
chooses for the inputs' device, so "per-device kernels" are registry entries rather than
``if device ==`` chains. The fake kernel checks shapes with the same validator, so
``torch.compile(fullgraph=True)`` sees the same errors. The backward is the chosen backend's
``backward`` (by default the reference's analytical backward, which runs on any device), fed the
forward's saved ``out`` and ``lse`` so that it does not recompute the forward.
"""

from __future__ import annotations

import operator
from typing import Sequence, Tuple

import torch
from torch import Tensor

from . import registry
from .arguments import ARG_INDEX, ARG_NAMES, DIFFERENTIABLE, SCHEMA, bind
from .inputs import SelectiveAttentionInputs, validate

__all__ = ["SCHEMA", "ARG_NAMES", "plain_eager_call", "run_backend", "selective_attention_op"]


def run_backend(inp: SelectiveAttentionInputs) -> Tuple[Tensor, Tensor]:
    """Run the backend the registry chooses (unknown or unfit forced names raise ValueError)."""
    return registry.choose_backend(inp).forward(inp)


def plain_eager_call(args: Sequence) -> bool:
    """Nothing can intercept or differentiate a call with these arguments (all of them, in the schema's
    order): no dispatch or function mode, no functorch transform, the differentiable arguments are
    plain tensors (or None) and none needs a gradient. Such a call may run the implementation
    directly, without the dispatcher's autograd and redispatch round trip. (The API asks
    ``torch.compiler.is_compiling()`` first: dynamo traces its Python, and must see the op.)"""
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    grad = torch.is_grad_enabled()
    for t in _differentiable(args):
        # None and non-tensors pass here (the validator raises a TypeError naming a non-tensor)
        if isinstance(t, Tensor) and (type(t) is not Tensor or (grad and t.requires_grad)):
            return False
    return True


_differentiable = operator.itemgetter(*(ARG_INDEX[n] for n in DIFFERENTIABLE))


# Defined with torch.library.Library rather than @custom_op: custom_op's Python wrapper costs about
# 20 us per call on our 2-core CPUs against about 7 us for a plain define/impl (docs/architecture.md),
# and decode loops call this op once per layer per step. The fake kernel is registered through
# torch.library.register_fake; the Autograd kernel is ours (below), and opcheck tests both.
_lib = torch.library.Library("attention", "DEF")
_lib.define("selective_attention" + SCHEMA)


def _impl(*args, **kwargs):
    # The dispatcher hands a Python kernel only the arguments the caller gave: validate() binds the
    # rest from the table's defaults.
    return run_backend(validate(*args, **kwargs))


# One implementation for every device: the registry picks the backend from the inputs' device.
_lib.impl("selective_attention", _impl, "CompositeExplicitAutograd")

selective_attention_op = torch.ops.attention.selective_attention.default


@torch.library.register_fake("attention::selective_attention")
def _fake(*args, **kwargs):
    inp = validate(*args, check_contents=False, **kwargs)  # same shape/dtype errors at trace time
    q = inp.q
    return q.new_empty(q.shape[0], q.shape[1], inp.d_v), q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs: Sequence, output):
    # The backward gets an inputs object like the forward's: scalars as validated (d_v, sm_scale filled
    # in), tensors as the caller gave them (attn_sink keeps its dtype, so its gradient does too).
    args = bind(tuple(inputs), None)
    inp = validate(*args, check_contents=False)
    ctx.tensor_names = [n for n, x in zip(ARG_NAMES, args) if isinstance(x, Tensor)]
    out, lse = output
    ctx.save_for_backward(*(x for x in args if isinstance(x, Tensor)), out, lse)
    ctx.scalars = {n: getattr(inp, n) for n in ARG_NAMES if n not in ctx.tensor_names}


def _backward(ctx, grad_out, grad_lse):
    *tensors, out, lse = ctx.saved_tensors
    inp = SelectiveAttentionInputs(**ctx.scalars, **dict(zip(ctx.tensor_names, tensors)))
    grads = registry.choose_backward(inp).backward(inp, out, lse, grad_out, grad_lse)
    g = dict(zip(DIFFERENTIABLE, grads))
    return tuple(g.get(n) for n in ARG_NAMES)


class _Differentiable(torch.autograd.Function):
    """The op when an argument needs a gradient: what ``torch.library.register_autograd`` builds, the
    forward run below autograd and the backward chosen by the registry (``_backward``)."""

    @staticmethod
    def forward(ctx, keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = selective_attention_op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        _setup_context(ctx, args, output)
        ctx.num_args = len(args)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # one gradient per argument the dispatcher passed (it leaves out trailing defaults); none for keyset
        return (None,) + _backward(ctx, grad_out, grad_lse)[:ctx.num_args]


def _autograd_kernel(keyset, *args):
    """The op's Autograd kernel. A call where nothing needs a gradient, with plain tensors and nothing
    intercepting (the decode step), runs the implementation at once: the redispatch below autograd
    that ``register_autograd``'s kernel makes costs ~15 us of a ~90 us tiny call on our CPUs and
    reaches the same ``_impl``. Anything else (a subclass, a mode, a functorch transform) redispatches."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return _Differentiable.apply(keyset, *args)
    full = bind(args, None)  # the dispatcher leaves out trailing defaults
    if plain_eager_call(full):
        return run_backend(validate(*full))
    with torch._C._AutoDispatchBelowAutograd():
        return selective_attention_op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


_lib.impl("selective_attention", _autograd_kernel, "Autograd", with_keyset=True)
