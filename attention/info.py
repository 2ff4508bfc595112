"""``python -m attention.info``: every backend, whether it can run here, and why not."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import attention
from attention.registry import backends, npu_available


def _devices_here():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    if npu_available():
        devs.append("npu")
    return devs


def report() -> str:
    lines = [
        f"attention {attention.__version__}  torch {torch.__version__}  python {platform.python_version()}  "
        f"{platform.machine()}",
        f"devices here: {', '.join(_devices_here())}",
    ]
    if torch.cuda.is_available():
        lines.append(f"cuda device: {torch.cuda.get_device_name()}")
    lines.append("")
    # One registry for every op: one row per backend, with the ops it implements.
    rows = [("backend", "devices", "status", "priority (cpu/cuda/npu)", "ops", "detail")]
    for b in backends():
        why = b.unavailable_reasons()
        status = "available" if not why else "unavailable"
        devs = ",".join(sorted(b.device_types())) or "-"
        prio = "/".join(str(b.priority_for(d)) if b.runs_on(d) else "-" for d in ("cpu", "cuda", "npu"))
        rows.append((b.name, devs, status, prio, ",".join(sorted(b.ops)) or "-", "; ".join(why) or b.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
    for b in backends():
        extra = b.info()
        if extra:
            lines.append("")
            lines.append(f"[{b.name}]")
            for k, v in extra.items():
                lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def main(argv=None) -> int:
    # No options yet, but a parser all the same: an unknown flag (a typo of a future option) is a
    # usage error with exit 2, not a silent success.
    argparse.ArgumentParser(prog="python -m attention.info", description=__doc__.split(": ", 1)[1].strip()).parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
