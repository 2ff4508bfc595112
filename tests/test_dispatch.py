"""The tiny-call hot path (api -> ops -> registry -> reference) decides what the general code decides.

Nothing here is timed: the dispatch overhead is a benchmark figure (bench/reference_targets.py). These
tests check that the shortcuts taken for speed are exact.
"""

import os

import pytest

from attention.inputs import env_value

_NAME = "ATTENTION_TEST_ONLY_SWITCH"


def test_env_value_reads_the_live_environment(monkeypatch):
    """A switch set, changed or removed while the process runs is seen on the next read, as with
    os.environ.get (the registry reads ATTENTION_BACKEND on every call)."""
    monkeypatch.delenv(_NAME, raising=False)
    assert env_value(_NAME) == os.environ.get(_NAME, "") == ""
    monkeypatch.setenv(_NAME, "reference")
    assert env_value(_NAME) == os.environ.get(_NAME, "") == "reference"
    monkeypatch.setenv(_NAME, "tr\u00eft\u00f6n")  # decoded as os.environ decodes it
    assert env_value(_NAME) == os.environ.get(_NAME) == "tr\u00eft\u00f6n"
    monkeypatch.delenv(_NAME)
    assert env_value(_NAME) == ""
    assert env_value("PATH") == os.environ.get("PATH", "")


def test_env_value_follows_a_replaced_environment(monkeypatch):
    """A plain mapping standing in for os.environ (as some tests do) is read, not the process's."""
    monkeypatch.setenv(_NAME, "from the process")
    monkeypatch.setattr(os, "environ", {_NAME: "from the stand-in"})
    assert env_value(_NAME) == "from the stand-in"
    monkeypatch.setattr(os, "environ", {})
    assert env_value(_NAME) == ""


@pytest.mark.parametrize("value, forced", [("", None), ("reference", "reference"), ("  reference ", "reference")])
def test_forced_backend_name_reads_the_environment_each_call(monkeypatch, value, forced):
    import torch

    import attention
    from attention import registry

    inp = attention.validate(torch.randn(1, 2, 8), torch.randn(4, 1, 8), torch.zeros(1, 1, 2, dtype=torch.int32))
    monkeypatch.setenv("ATTENTION_BACKEND", value)
    assert registry.forced_backend_name(inp) == forced
    monkeypatch.delenv("ATTENTION_BACKEND")
    assert registry.forced_backend_name(inp) is None


# ------------------------------------------------ the plain-call shortcut vs the dispatcher's full path
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import attention  # noqa: E402
from attention.arguments import bind  # noqa: E402
from attention.ops import plain_eager_call  # noqa: E402
from attention.testing import CASES, same_bits  # noqa: E402


class _PassThrough(TorchDispatchMode):
    """A mode that intercepts nothing but makes every call non-plain: the op then redispatches below
    autograd to its implementation, the way a traced or wrapped call goes."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _positional(args: dict) -> tuple:
    """Keyword arguments of the API -> every argument of the op, in the schema's order."""
    rest = dict(args)
    return bind((rest.pop("q"), rest.pop("kv"), rest.pop("indices")), rest)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_shortcut_and_full_dispatch_agree(case):
    """attention.selective_attention and torch.ops.attention... run the implementation directly for a
    plain call (no dispatcher round trip); under a mode the op goes the whole way. Same bits either way."""
    args = case.make(torch.float32)
    op = torch.ops.attention.selective_attention.default
    full = _positional(args)
    api_out, api_lse = attention.selective_attention(**args, return_lse=True)
    op_out, op_lse = op(*full)
    mode = _PassThrough()
    with mode:
        ref_out, ref_lse = op(*full)
    assert "attention.selective_attention.default" in mode.seen  # the op itself went through the mode
    for got in ((api_out, api_lse), (op_out, op_lse)):
        assert same_bits(got[0], ref_out) and same_bits(got[1], ref_lse)


@pytest.mark.parametrize("bad, error", [({"q": torch.randn(1, 4, 16, dtype=torch.float64)}, TypeError),
                                        ({"indices": torch.zeros(2, 1, 8, dtype=torch.int32)}, ValueError),
                                        ({"block_size": 0}, ValueError)])
def test_shortcut_and_full_dispatch_raise_alike(bad, error):
    args = dict(q=torch.randn(1, 4, 16), kv=torch.randn(64, 1, 16), indices=torch.zeros(1, 1, 8, dtype=torch.int32))
    args.update(bad)
    full = _positional(args)
    messages = []
    for mode in (None, _PassThrough()):
        with pytest.raises(error) as e:
            if mode is None:
                torch.ops.attention.selective_attention.default(*full)
            else:
                with mode:
                    torch.ops.attention.selective_attention.default(*full)
        messages.append(str(e.value))
    with pytest.raises(error) as e:
        attention.selective_attention(**args)
    assert messages[0] == messages[1] == str(e.value)


def test_plain_eager_call_declines_whatever_could_intercept_or_differentiate():
    q, kv, idx = torch.randn(1, 4, 16), torch.randn(64, 1, 16), torch.zeros(1, 1, 8, dtype=torch.int32)
    names = ("q", "kv", "v", "q_rope", "kv_rope", "attn_sink")
    base = dict(q=q, kv=kv, indices=idx)
    assert plain_eager_call(bind((q, kv, idx), None))
    for name in names:  # each differentiable argument needing a gradient
        x = dict(base, v=torch.randn(64, 1, 8), q_rope=torch.randn(1, 4, 4), kv_rope=torch.randn(64, 1, 4),
                 attn_sink=torch.zeros(4))
        x[name] = x[name].clone().requires_grad_(True)
        full = bind((x.pop("q"), x.pop("kv"), x.pop("indices")), x)
        assert not plain_eager_call(full), name
        with torch.no_grad():
            assert plain_eager_call(full), name  # no gradient can flow
    assert not plain_eager_call(bind((torch.nn.Parameter(q, requires_grad=False), kv, idx), None))  # a subclass
    with _PassThrough():
        assert not plain_eager_call(bind((q, kv, idx), None))
    seen = []

    def f(qb):
        seen.append(plain_eager_call(bind((qb, kv, idx), None)))
        return qb

    torch.func.vmap(f)(q[None])
    assert seen == [False]  # a functorch transform wraps the tensors: the dispatcher must see the op
