"""Timers, the device's own limits (matmul peak, copy bandwidth) and the machine description.

Timing rules (docs/style.md rule 9): warm-up calls (autotuning, first-call allocation, lazy imports)
are never timed; the runner takes the samples of the implementations of one problem in interleaved
rounds, so a burst of load from another process lands on all of them rather than on one; a GPU is timed with CUDA events around the calls and synchronised once per
sample; the CPU with ``time.perf_counter``. Each sample averages ``inner`` back-to-back calls, with
``inner`` chosen so a sample lasts at least ``min_sample_s`` (tiny problems would otherwise measure
the timer); the report gives the median and the minimum of the samples.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List

import torch


@contextlib.contextmanager
def nan_fill(enabled: bool):
    """ATTENTION_NAN_FILL on for checks (an output element a kernel never writes fails them), off
    while timing (the fill is one memset per output that a real caller does not pay)."""
    old = os.environ.get("ATTENTION_NAN_FILL")
    os.environ["ATTENTION_NAN_FILL"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTENTION_NAN_FILL", None)
        else:
            os.environ["ATTENTION_NAN_FILL"] = old


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]


@dataclass
class Timing:
    samples_ms: List[float] = field(default_factory=list)
    inner: int = 1
    timer: str = "perf_counter"

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


def timer_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda_events"
    return "perf_counter" if device.type == "cpu" else f"perf_counter+{device.type}.synchronize"


def warm_and_calibrate(fn: Callable[[], object], device: torch.device, warmup: int = 2,
                       min_sample_s: float = 0.005, max_inner: int = 200) -> int:
    """Untimed warm-up calls, then the number of back-to-back calls one sample should hold."""
    for _ in range(max(1, warmup)):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    one = max(time.perf_counter() - t0, 1e-7)
    return int(min(max_inner, max(1, min_sample_s / one)))


def sample_ms(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Mean time of one call over ``inner`` back-to-back calls, in ms."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / inner


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5,
            min_sample_s: float = 0.005, max_inner: int = 200) -> Timing:
    inner = warm_and_calibrate(fn, device, warmup, min_sample_s, max_inner)
    return Timing([sample_ms(fn, device, inner) for _ in range(repeats)], inner, timer_name(device))


def measure_limits(device: torch.device, dtype: torch.dtype, quick: bool = False) -> Dict[str, object]:
    """Matmul peak and copy bandwidth of this device, measured now (best of several runs).

    On the CPU the matmul runs in float32 whatever the problem dtype, because that is what every CPU
    path computes in (bfloat16 matmul there is ~400x slower, docs/traps.md).
    """
    cpu = device.type == "cpu"
    mdt = torch.float32 if cpu else dtype
    n = (512 if quick else 1024) if cpu else 8192
    a = torch.randn(n, n, device=device).to(mdt)
    b = torch.randn(n, n, device=device).to(mdt)
    c = torch.empty(n, n, device=device, dtype=mdt)
    mm = time_fn(lambda: torch.mm(a, b, out=c), device, warmup=2, repeats=5 if quick else 9,
                 min_sample_s=0.02)
    flops = 2.0 * n ** 3
    nbytes = (64 << 20) if cpu else (1 << 30)
    if quick:
        nbytes //= 4
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    cp = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=5 if quick else 9, min_sample_s=0.02)
    del a, b, c, src, dst
    return {
        "matmul_dtype": str(mdt).replace("torch.", ""),
        "matmul_shape": [n, n, n],
        "matmul_peak_gflops": flops / (mm.min_ms * 1e-3) / 1e9,
        "matmul_median_gflops": flops / (mm.median_ms * 1e-3) / 1e9,
        "copy_bytes": 2 * nbytes,  # read + write
        "copy_gbps": 2 * nbytes / (cp.min_ms * 1e-3) / 1e9,
        "copy_median_gbps": 2 * nbytes / (cp.median_ms * 1e-3) / 1e9,
        "rule": "best (min time) of the repeats; fractions below divide by these",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        pass
    return "unknown"


def machine_info(device: torch.device) -> Dict[str, object]:
    import attention

    info: Dict[str, object] = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "attention": getattr(attention, "__version__", "?"),
        "git_commit": _git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    elif device.type == "npu":
        try:
            info["device_name"] = torch.npu.get_device_name()  # type: ignore[attr-defined]
        except Exception:
            info["device_name"] = "npu"
    else:
        n = info["torch_threads"]
        info["device_name"] = f"CPU: {info['cpu']} ({n} torch thread{'s' if n != 1 else ''} of {info['cpu_count']} cores)"
    return info
