"""One backend registry for every op (docs/style.md rule 3): attention, its backward, and the selection ops.

A backend is a small class that *declares* what it has, opt-in (the default is nothing):

- ``ops``: op name -> the features of that op it implements, e.g.
  ``{"attention": frozenset({"latent", "paged", ...}), "select": frozenset({"contiguous"})}``.
  Op names: ``attention``, ``attention_backward``, ``lightning_indexer``, ``topk_indices``, ``select``,
  ``merge`` (``merge_attention_states``).
- ``priorities``: device type -> rank, lower first (``{"cuda": 10, "cpu": 50}``; ``"*"`` = any device).
- ``dtypes``, ``max_head_dim``, ``max_heads_per_kv``, and ``limit_reasons(inp)`` for shape limits.

``not_supported_reasons(inp) -> list[str]`` answers from those declarations; ``supports`` is "no
reasons". Automatic choice walks the backends of the inputs' device in priority order and takes the
first with no reasons; the choice is cached on the inputs' ``choice_key()`` (op, device type, dtype,
declared features and the sizes limits read), so a backend must decide from exactly those.
``backend="name"`` (or the op's environment variable, ``ATTENTION_BACKEND`` /
``ATTENTION_SELECTION_BACKEND``) forces one; a forced backend that cannot run raises with its
reasons. When nothing fits, the error lists every backend's reasons.

The backward of the attention op is chosen the same way for the op ``attention_backward``; a forced
forward backend that has no backward of its own leaves the backward to the automatic choice.
"""

from __future__ import annotations

import warnings
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch

from .inputs import dtype_name, env_value, new_outputs

#: Every op the registry chooses a backend for.
OPS = ("attention", "attention_backward", "lightning_indexer", "topk_indices", "select", "merge")

#: Quantized caches: "kv_fp8" when kv or a separate v is float8_e4m3fn, "kv_int8" when one is int8
#: (with kv_scale / v_scale; docs/contract.md "Quantized caches").
KV_QUANT_FEATURES: FrozenSet[str] = frozenset({"kv_fp8", "kv_int8"})
#: Every feature name ``SelectiveAttentionInputs.features`` can report (a backend lists the ones it has).
ATTENTION_FEATURES: FrozenSet[str] = frozenset({
    "latent", "separate_v", "contiguous", "paged", "rope", "block", "causal", "sink", "varlen",
    "shared_indices",
}) | KV_QUANT_FEATURES
#: Every feature name ``SelectionInputs.features`` can report.
#: "fp8" / "int8": quantized q_idx / k_idx with scales; "window": per-token key windows
#: (cu_seqlen_ks / cu_seqlen_ke); "lengths": topk_indices' per-row lengths.
SELECTION_FEATURES: FrozenSet[str] = frozenset({"contiguous", "paged", "varlen", "causal", "block", "fp8", "int8",
                                                "window", "lengths"})


class Backend:
    """Base class: declare capabilities as class attributes (opt-in), implement ``forward``."""

    name: str = ""
    description: str = ""
    #: device type -> rank (lower runs first); "*" ranks every device not listed.
    priorities: Mapping[str, int] = {}
    #: op -> features of that op this backend implements; an op not listed is not implemented.
    ops: Mapping[str, FrozenSet[str]] = {}
    dtypes: FrozenSet[torch.dtype] = frozenset()
    max_head_dim: Optional[int] = None  # largest Dqk / Dv / Dr it handles (attention)
    max_heads_per_kv: Optional[int] = None  # query heads per kv head (attention)

    # ---- machine level ----
    def unavailable_reasons(self) -> List[str]:
        """Why this backend cannot run on this machine at all (not built, no toolkit...)."""
        return []

    def device_types(self) -> FrozenSet[str]:
        return frozenset(self.priorities)

    def priority_for(self, device_type: str) -> int:
        p = self.priorities
        return p[device_type] if device_type in p else p.get("*", 1 << 30)

    def runs_on(self, device_type: str) -> bool:
        d = self.device_types()
        return "*" in d or device_type in d

    def implements(self, op: str) -> bool:
        return op in self.ops

    # ---- per call ----
    def not_supported_reasons(self, inp) -> List[str]:
        """Why these inputs cannot run here, from the declarations and ``limit_reasons``. Must depend
        only on what ``inp.choice_key()`` holds (automatic choices are cached on it)."""
        reasons = list(self.unavailable_reasons())
        op = inp.op
        if op not in self.ops:
            reasons.append(f"op {op} not implemented")
            return reasons
        dev = inp.device.type
        if not self.runs_on(dev):
            reasons.append(f"device {dev} not in {sorted(self.device_types())}")
        if inp.dtype not in self.dtypes:
            reasons.append(f"dtype {dtype_name(inp.dtype)} not supported")
        missing = inp.features - self.ops[op]
        if missing:
            reasons.append(f"features not supported: {', '.join(sorted(missing))}")
        if op == "attention":
            if self.max_head_dim is not None:
                widest = max(inp.head_dim, inp.d_v, inp.rope_dim)
                if widest > self.max_head_dim:
                    reasons.append(f"head width {widest} > {self.max_head_dim}")
            if self.max_heads_per_kv is not None:
                if inp.heads_per_kv > self.max_heads_per_kv:
                    reasons.append(f"{inp.heads_per_kv} query heads per kv head > {self.max_heads_per_kv}")
        if not reasons:
            reasons.extend(self.limit_reasons(inp))
        return reasons

    def limit_reasons(self, inp) -> List[str]:
        """Shape limits beyond the declared ones (launch grids, on-chip memory); none by default."""
        return []

    def supports(self, inp) -> bool:
        return not self.not_supported_reasons(inp)

    def forward(self, inp):
        """Run ``inp.op`` on validated inputs: (out, lse) for attention, one tensor for selection."""
        raise NotImplementedError

    def backward(self, inp, out, lse, grad_out, grad_lse) -> tuple:
        """Gradients of the attention op for the arguments in ``attention.arguments.DIFFERENTIABLE``
        order. Default: the reference's analytical backward (any device), fed the forward's saved
        ``out`` and ``lse``; a backend with a backward kernel overrides it and declares
        ``attention_backward`` in ``ops``."""
        import python_ref

        return python_ref.selective_attention_backward(grad_out, grad_lse, inp.q, inp.kv, inp.indices, out=out,
                                                       lse=lse, **inp.reference_kwargs())

    new_outputs = staticmethod(new_outputs)

    def test_devices(self) -> List[str]:
        """Devices on which this machine can exercise the backend (the test matrix uses these)."""
        if self.unavailable_reasons():
            return []
        devs = []
        if self.runs_on("cpu"):
            devs.append("cpu")
        if self.runs_on("cuda") and torch.cuda.is_available():
            devs.append("cuda")
        if self.runs_on("npu") and npu_available():
            devs.append("npu")
        return devs

    def info(self) -> Dict[str, str]:
        """Extra lines for ``python -m attention.info`` (tuning, build details)."""
        return {}


def npu_available() -> bool:
    """An Ascend NPU through torch_npu (which registers ``torch.npu`` when imported)."""
    npu = getattr(torch, "npu", None)
    return npu is not None and npu.is_available()


_BACKENDS: Dict[str, Backend] = {}
_warned: set = set()


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    if not backend.name:
        raise ValueError("a backend needs a name")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered")
    unknown = set(backend.ops) - set(OPS)
    if unknown:
        raise ValueError(f"backend {backend.name!r} declares unknown ops {sorted(unknown)}; ops are {OPS}")
    _BACKENDS[backend.name] = backend
    _choice_cache.clear()
    return backend


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)
    _choice_cache.clear()


def backends(op: Optional[str] = None) -> List[Backend]:
    """Registered backends (registration order); with ``op``, those that implement it."""
    return [b for b in _BACKENDS.values() if op is None or b.implements(op)]


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {name!r}") from None


def backends_for(device_type: str, op: str = "attention") -> List[Backend]:
    """Backends that implement ``op`` and run on ``device_type``, in priority order."""
    cands = [b for b in _BACKENDS.values() if b.implements(op) and b.runs_on(device_type)]
    return sorted(cands, key=lambda b: b.priority_for(device_type))


def forced_backend_name(inp) -> Optional[str]:
    """The argument wins over the op's environment variable."""
    if inp.backend:
        return inp.backend
    if inp.force_env is None:  # an op no environment variable forces (merge)
        return None
    return env_value(inp.force_env).strip() or None


# The automatic choice is made on every decode step of every layer, so it is cached on the inputs'
# choice_key(): op, device type, dtype, declared features and the sizes the limits read (never a
# tensor's contents: reading them would be a device sync). A growing kv cache does not change the
# key. Any registry change clears the cache; its size is bounded all the same.
_choice_cache: Dict[tuple, Backend] = {}
_CACHE_LIMIT = 4096


def choose_backend(inp, op: Optional[str] = None) -> Backend:
    """The backend for ``op`` (default ``inp.op``) on these inputs."""
    op = op or inp.op
    forced = forced_backend_name(inp)
    if forced is not None and (op == inp.op or get_backend(forced).implements(op)):
        return _choose_forced(inp, forced, op)
    key = (op,) + inp.choice_key()
    try:
        b = _choice_cache.get(key)
    except TypeError:  # symbolic sizes (tracing with dynamic shapes) do not hash: choose uncached
        return _choose_automatic(inp, op)
    if b is None:
        b = _choose_automatic(inp, op)
        if len(_choice_cache) >= _CACHE_LIMIT:
            _choice_cache.clear()
        _choice_cache[key] = b
    return b


def choose_backward(inp) -> Backend:
    """The backend whose ``backward`` differentiates the attention op for these inputs."""
    return choose_backend(inp, "attention_backward")


def _with_op(inp, op: str):
    """``inp`` as seen by ``op``'s declarations (the backward is asked about its own op)."""
    return inp if op == inp.op else _OpView(inp, op)


class _OpView:
    __slots__ = ("_inp", "op")

    def __init__(self, inp, op):
        self._inp, self.op = inp, op

    def __getattr__(self, name):
        return getattr(self._inp, name)


def _choose_forced(inp, forced: str, op: str) -> Backend:
    b = get_backend(forced)
    reasons = b.not_supported_reasons(_with_op(inp, op))
    if reasons:
        raise ValueError(f"backend {forced!r} cannot run {op} on these inputs ({inp.describe()}): "
                         f"{'; '.join(reasons)}")
    return b


def _choose_automatic(inp, op: str) -> Backend:
    view = _with_op(inp, op)
    dev = inp.device.type
    declined: List[Tuple[Backend, List[str]]] = []
    for b in backends_for(dev, op):
        reasons = b.not_supported_reasons(view)
        if not reasons:
            _warn_fallback(b, declined)
            return b
        declined.append((b, reasons))
    lines = "\n".join(f"  {b.name}: {'; '.join(b.not_supported_reasons(view)) or 'ok'}" for b in _BACKENDS.values())
    raise ValueError(f"no backend can run {op} on these inputs ({inp.describe()}) on device {dev}:\n{lines}")


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
