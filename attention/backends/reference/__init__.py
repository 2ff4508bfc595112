"""The `reference` backend: python_ref on any device. The CPU production path and the fallback."""

from __future__ import annotations

from python_ref.selective_attention import forward_positional

from ...registry import Backend


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch (python_ref): chunked gather, float32 compute; any device"
    devices = frozenset({"*"})
    priority = 1000  # last resort on accelerators...

    def priority_for(self, device_type: str) -> int:
        return 0 if device_type == "cpu" else self.priority  # ...but first on the CPU

    def forward(self, inp):
        return forward_positional(inp.q, inp.kv, inp.indices, inp.v, inp.d_v, inp.q_rope, inp.kv_rope, inp.sm_scale,
                                  inp.block_size, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.block_table, inp.seqlens_k,
                                  inp.causal, inp.attn_sink)
