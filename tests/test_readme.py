"""The README's Python examples run and do what they say."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("i", range(len(_python_blocks())))
def test_readme_example_runs(i, capsys):
    code = _python_blocks()[i]
    ns = {}
    exec(compile(code, f"README.md block {i}", "exec"), ns)
    if "out" in ns and "lse" in ns:
        import torch
        assert torch.isfinite(ns["out"].float()).all()


def test_readme_has_both_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
