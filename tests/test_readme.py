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


def test_readme_make_commands_exist():
    """Every `make X` the README tells a user to run is a target of the Makefile (demo and test at least)."""
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (README.parent / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"make ([a-z][\w-]*)", README.read_text()))
    assert {"demo", "test"} <= named
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_readme_backend_table_matches_the_registry():
    """The README's backend table lists exactly the registered backends, each one get_backend() finds."""
    import attention

    table = README.read_text().split("## Backends", 1)[1]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert listed == {b.name for b in attention.backends()}
    for name in listed:
        assert attention.get_backend(name).name == name
