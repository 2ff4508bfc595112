"""The `reference` backend: python_ref on any device. The CPU production path and the fallback."""

from __future__ import annotations

import python_ref

from ..registry import Backend


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch (python_ref): chunked gather, float32 compute; any device"
    devices = frozenset({"*"})
    priority = 1000  # last resort on accelerators...

    def priority_for(self, device_type: str) -> int:
        return 0 if device_type == "cpu" else self.priority  # ...but first on the CPU

    def forward(self, inp):
        return python_ref.selective_attention(inp.q, inp.kv, inp.indices, **inp.reference_kwargs())
