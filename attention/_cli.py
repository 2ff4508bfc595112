"""What every command line of the package shares (attention.verify, attention.tune, python -m bench).

The rule they follow: a bad flag or an output that cannot be written is a usage error found *before*
any work starts (argparse's ``error``: a message and exit status 2, never a traceback), and whatever
was measured is printed before it is written anywhere, so a write that still fails loses nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

DEVICE_TYPES = ("cpu", "cuda", "npu")


def device_arg(argv: Sequence[str]) -> Optional[str]:
    """The value of ``--device`` in either spelling (``--device X`` or ``--device=X``), found before
    argparse runs: the CLIs must decide TRITON_INTERPRET before anything imports triton."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return None


def _int_at_least(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} is not {what}")
        return v

    parse.__name__ = what.replace(" ", "_")  # argparse names the type in some messages
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "a non-negative integer")


def nonnegative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v >= 0 or v == float("inf"):  # rejects NaN too
        raise argparse.ArgumentTypeError(f"{s} is not a finite non-negative number")
    return v


def device_type(s: str) -> str:
    """argparse type of ``--device``: cpu, cuda or npu, with an optional index (``cuda:1``)."""
    kind, _, index = s.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{s!r}: expected one of {', '.join(DEVICE_TYPES)} "
                                         f"(with an optional index, e.g. cuda:1)")
    return s


def dir_problem(path) -> Optional[str]:
    """Why files cannot be created in directory ``path`` (created if missing), or None.

    Checked by creating and removing a temporary file, the only test that answers for read-only
    mounts, ACLs and root alike."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{p} exists and is not a directory"
    except OSError as e:
        return f"cannot create directory {p}: {e.strerror or e}"
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        return f"cannot write in {p}: {e.strerror or e}"
    return None


def file_problem(path) -> Optional[str]:
    """Why file ``path`` cannot be written (its directory is created if missing), or None. Nothing is
    written to ``path`` itself, so a failed run leaves no empty output behind."""
    p = Path(path)
    if p.is_dir():
        return f"{p} is a directory"
    why = dir_problem(p.parent if str(p.parent) else ".")
    if why:
        return why
    if p.exists() and not os.access(p, os.W_OK):
        return f"{p} is not writable"
    return None


def usage_error(ap: argparse.ArgumentParser, message: str) -> int:
    """argparse's error report (usage line, ``prog: error: message`` on stderr) as a return value of 2,
    for ``main`` functions that return their exit status instead of exiting."""
    ap.print_usage(sys.stderr)
    print(f"{ap.prog}: error: {message}", file=sys.stderr)
    return 2


def device_unavailable(device: str) -> Optional[str]:
    """Why ``device`` (cpu, cuda, npu, optionally with an index) cannot run here, or None."""
    import torch

    kind, _, index = device.partition(":")
    if index and not index.isdigit():
        return f"device index {index!r} is not a number"
    if kind == "cpu":
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        count = torch.cuda.device_count()
    elif kind == "npu":
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            return "torch.npu is not available (torch_npu not imported or no NPU)"
        count = npu.device_count()
    else:
        return f"unknown device type {kind!r} (expected {', '.join(DEVICE_TYPES)})"
    if index and int(index) >= count:
        return f"{kind} has {count} device(s) here"
    return None
