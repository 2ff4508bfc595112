"""Backend registry and automatic dispatch (STYLE.md rule 3: no device chains outside this file).

A backend is a small class that *declares* what it supports (devices, dtypes, head widths,
features) and answers ``not_supported_reasons(inputs) -> list[str]``. Automatic choice walks the
backends registered for the inputs' device in priority order and takes the first with no reasons.
``backend="name"`` (or ``ATTENTION_BACKEND=name``) forces one; a forced backend that cannot run
raises with its reasons. When nothing fits, the error lists every backend's reasons.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from .inputs import FLOAT_DTYPES, SelectiveAttentionInputs

# Every feature name SelectiveAttentionInputs.features can report.
ALL_FEATURES: FrozenSet[str] = frozenset({
    "latent", "separate_v", "contiguous", "paged", "rope", "block", "causal", "sink", "varlen",
    "shared_indices",
})


class Backend:
    """Base class: declare capabilities as class attributes, implement ``forward``."""

    name: str = ""
    description: str = ""
    #: device types this backend runs on ("cpu", "cuda", "npu"); "*" = any device.
    devices: FrozenSet[str] = frozenset()
    #: lower runs first; a backend may rank differently per device (see ``priority_for``).
    priority: int = 100
    dtypes: FrozenSet[torch.dtype] = frozenset(FLOAT_DTYPES)
    features: FrozenSet[str] = ALL_FEATURES
    max_head_dim: Optional[int] = None  # largest Dqk / Dv / Dr it handles
    max_heads_per_kv: Optional[int] = None

    # ---- machine level ----
    def unavailable_reasons(self) -> List[str]:
        """Why this backend cannot run on this machine at all (not built, no toolkit...)."""
        return []

    def device_types(self) -> FrozenSet[str]:
        return self.devices

    def priority_for(self, device_type: str) -> int:
        return self.priority

    def runs_on(self, device_type: str) -> bool:
        d = self.device_types()
        return "*" in d or device_type in d

    # ---- per call ----
    def not_supported_reasons(self, inp: SelectiveAttentionInputs) -> List[str]:
        """Why these inputs cannot run here. Must depend only on the inputs' device, dtypes,
        features and shapes (automatic choices are cached on exactly that signature)."""
        reasons = list(self.unavailable_reasons())
        dev = inp.device.type
        if not self.runs_on(dev):
            reasons.append(f"device {dev} not in {sorted(self.device_types())}")
        if inp.dtype not in self.dtypes:
            reasons.append(f"dtype {str(inp.dtype).replace('torch.', '')} not supported")
        missing = inp.features - self.features
        if missing:
            reasons.append(f"features not supported: {', '.join(sorted(missing))}")
        if self.max_head_dim is not None:
            widest = max(inp.head_dim, inp.d_v, inp.rope_dim)
            if widest > self.max_head_dim:
                reasons.append(f"head width {widest} > {self.max_head_dim}")
        if self.max_heads_per_kv is not None:
            hg = inp.num_heads // inp.num_kv_heads
            if hg > self.max_heads_per_kv:
                reasons.append(f"{hg} query heads per kv head > {self.max_heads_per_kv}")
        return reasons

    def supports(self, inp: SelectiveAttentionInputs) -> bool:
        return not self.not_supported_reasons(inp)

    def forward(self, inp: SelectiveAttentionInputs) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def new_outputs(inp: SelectiveAttentionInputs) -> Tuple[torch.Tensor, torch.Tensor]:
        """(out [T, H, Dv] q.dtype, lse [T, H] float32) for a kernel to write into.

        Filled with NaN when ATTENTION_NAN_FILL=1 (the test suite and verify set it), so an element
        a kernel fails to write cannot pass a comparison; uninitialised otherwise.
        """
        T, H = inp.num_tokens, inp.num_heads
        if os.environ.get("ATTENTION_NAN_FILL", "0") not in ("", "0"):
            out = torch.full((T, H, inp.d_v), float("nan"), device=inp.device, dtype=inp.dtype)
            lse = torch.full((T, H), float("nan"), device=inp.device, dtype=torch.float32)
        else:
            out = torch.empty((T, H, inp.d_v), device=inp.device, dtype=inp.dtype)
            lse = torch.empty((T, H), device=inp.device, dtype=torch.float32)
        return out, lse

    def test_devices(self) -> List[str]:
        """Devices on which this machine can exercise the backend (the test matrix uses these)."""
        if self.unavailable_reasons():
            return []
        devs = []
        if self.runs_on("cpu"):
            devs.append("cpu")
        if self.runs_on("cuda") and torch.cuda.is_available():
            devs.append("cuda")
        npu = getattr(torch, "npu", None)
        if self.runs_on("npu") and npu is not None and npu.is_available():
            devs.append("npu")
        return devs

    def info(self) -> Dict[str, str]:
        """Extra lines for ``python -m attention.info`` (tuning, build details)."""
        return {}


_BACKENDS: Dict[str, Backend] = {}
_warned: set = set()


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    if not backend.name:
        raise ValueError("a backend needs a name")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    _choice_cache.clear()
    return backend


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)
    _choice_cache.clear()


def backends() -> List[Backend]:
    """All registered backends (registration order)."""
    return list(_BACKENDS.values())


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {name!r}") from None


def backends_for(device_type: str) -> List[Backend]:
    """Backends that run on ``device_type``, in priority order."""
    cands = [b for b in _BACKENDS.values() if b.runs_on(device_type)]
    return sorted(cands, key=lambda b: b.priority_for(device_type))


def forced_backend_name(inp: SelectiveAttentionInputs) -> Optional[str]:
    """The argument wins over the environment variable."""
    if inp.backend:
        return inp.backend
    env = os.environ.get("ATTENTION_BACKEND", "").strip()
    return env or None


def check_backend_name(name: Optional[str]) -> None:
    if name is not None:
        get_backend(name)


# The automatic choice is made on every decode step of every layer, so it is cached per input
# signature: device, dtypes, features and every tensor's shape. Backends must decide support from
# exactly that (tensor *contents* cannot matter: reading them would be a device sync). Any registry
# change clears the cache; it is bounded because a growing contiguous cache changes S every step.
_choice_cache: Dict[tuple, Backend] = {}
_CACHE_LIMIT = 4096


def _shape(t):
    return None if t is None else t.shape


def _signature(inp: SelectiveAttentionInputs) -> tuple:
    # Everything `features` and the declared limits derive from, without computing them: shapes
    # (torch.Size hashes as a tuple), dtypes, device type and the two flags shapes cannot show.
    return (inp.q.device.type, inp.q.dtype, inp.indices.dtype, inp.q.shape, inp.kv.shape, inp.indices.shape,
            _shape(inp.v), _shape(inp.q_rope), _shape(inp.cu_seqlens_q), _shape(inp.block_table), inp.d_v,
            inp.block_size, inp.causal, inp.attn_sink is None)


def choose_backend(inp: SelectiveAttentionInputs) -> Backend:
    forced = forced_backend_name(inp)
    if forced is None:
        key = _signature(inp)
        b = _choice_cache.get(key)
        if b is None:
            b = _choose_automatic(inp)
            if len(_choice_cache) >= _CACHE_LIMIT:
                _choice_cache.clear()
            _choice_cache[key] = b
        return b
    return _choose_forced(inp, forced)


def _choose_forced(inp: SelectiveAttentionInputs, forced: str) -> Backend:
    if forced is not None:
        b = get_backend(forced)
        reasons = b.not_supported_reasons(inp)
        if reasons:
            raise ValueError(f"backend {forced!r} cannot run these inputs ({inp.describe()}): {'; '.join(reasons)}")
        return b
    raise AssertionError("unreachable")


def _choose_automatic(inp: SelectiveAttentionInputs) -> Backend:
    dev = inp.device.type
    declined: List[Tuple[Backend, List[str]]] = []
    for b in backends_for(dev):
        reasons = b.not_supported_reasons(inp)
        if not reasons:
            _warn_fallback(b, declined)
            return b
        declined.append((b, reasons))
    every = [(b, b.not_supported_reasons(inp)) for b in _BACKENDS.values()]
    lines = "\n".join(f"  {b.name}: {'; '.join(r) or 'ok'}" for b, r in every)
    raise ValueError(f"no backend can run these inputs ({inp.describe()}) on device {dev}:\n{lines}")


def _warn_fallback(chosen: Backend, declined: List[Tuple[Backend, List[str]]]) -> None:
    """One warning per (backend, reason) when a preferred, *available* backend declined the call."""
    for b, reasons in declined:
        if b.unavailable_reasons():
            continue  # not built / not installed: info says so; no warning on every call
        key = (b.name, chosen.name, tuple(reasons))
        if key in _warned:
            continue
        _warned.add(key)
        warnings.warn(f"attention: backend {b.name!r} declined these inputs ({'; '.join(reasons)}); "
                      f"running {chosen.name!r} instead", RuntimeWarning, stacklevel=4)
