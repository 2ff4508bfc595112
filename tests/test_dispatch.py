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
