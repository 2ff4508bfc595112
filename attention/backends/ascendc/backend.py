"""The ``ascendc`` backend declaration: capabilities, priorities, info. What runs where is in launch.py."""

from __future__ import annotations

from typing import Dict, List

from ...inputs import FLOAT_DTYPES, SelectiveAttentionInputs
from ...registry import ATTENTION_FEATURES, Backend, npu_available
from .builds import NPU, TWIN
from .launch import ENTRY_POINTS, kernel_args
from .soc import current_soc, soc_table


#: Why float8 caches are declined (docs/ascendc.md "INT8 caches"): the A2/A3 (910B / 910C) cube and vector
#: units have no 8-bit float type, so an e4m3 cache would need a software decode on the vector cores.
NO_FP8 = ("Ascend A2/A3 (910B/910C) have no FP8: no float8 type in the cube or vector units (Cast.md lists "
          "none for A2/A3); quantize the cache to int8 (attention.quantize_kv(kv, torch.int8)) instead")


class AscendCBackend(Backend):
    name = "ascendc"
    description = "AscendC kernel (csrc/ascend): on cpu the CPU twin of the same source; on npu the chip build"
    priorities = {"npu": 10, "cpu": 60}  # first on npu; on cpu (the twin) after the reference
    # all of docs/spec.md section 1, and int8 caches (dequantized on the vector cores); no FP8 (NO_FP8)
    ops = {"attention": ATTENTION_FEATURES - {"kv_fp8"}}
    dtypes = frozenset(FLOAT_DTYPES)  # per SoC narrowed in limit_reasons (no bf16 / fp32 cube on some)

    # kept for callers that build the binding's arguments themselves (tests, bench/ascend_work.py)
    _args = staticmethod(kernel_args)

    def unavailable_reasons(self) -> List[str]:
        return [TWIN.error] if not TWIN.built and not NPU.built else []

    def device_types(self):
        return frozenset(e.build.device for e in ENTRY_POINTS.values() if e.build.built) or frozenset(self.priorities)

    def not_supported_reasons(self, inp) -> List[str]:
        reasons = super().not_supported_reasons(inp)
        if inp.op == "attention" and "kv_fp8" in inp.features:
            reasons.append(NO_FP8)  # why, beside the registry's "features not supported: kv_fp8"
        return reasons

    def limit_reasons(self, inp: SelectiveAttentionInputs) -> List[str]:
        entry = ENTRY_POINTS.get(inp.device.type)
        if entry is None:
            return [f"no ascendc build for {inp.device.type} tensors"]
        if not entry.build.built:
            return [entry.build.error]
        return entry.limit_reasons(inp)

    def forward(self, inp: SelectiveAttentionInputs):
        out, lse = self.new_outputs(inp)
        ENTRY_POINTS[inp.device.type].forward(inp, out, lse)
        return out, lse

    def test_devices(self) -> List[str]:
        devs = ["cpu"] if TWIN.built else []
        if NPU.built and npu_available():
            devs.append("npu")
        return devs

    def info(self) -> Dict[str, str]:
        lines: Dict[str, str] = {}
        lines[TWIN.label] = "built" if TWIN.built else TWIN.error
        lines[NPU.label] = "built (never run by its authors)" if NPU.built else NPU.error
        lines["quantized caches"] = "kv_int8 (int8 kv / v dequantized on the vector cores); kv_fp8: " + NO_FP8
        if NPU.built:
            try:
                lines["npu device report"] = str(NPU.module.device_soc())  # capacities the NPU tiling uses
            except Exception as e:  # pragma: no cover - needs an NPU
                lines["npu device report"] = f"unavailable ({e})"
        if not TWIN.built:
            return lines
        lines["twin SoC"] = f"{current_soc()} (ATTENTION_ASCEND_SOC)"
        ds = dict(T=1, H=128, Hkv=1, Dqk=576, Dv=512, K=2048, dtype="bfloat16")
        for s in soc_table():
            shape = dict(ds, dtype="bfloat16" if s["bf16"] else "float16")
            p = TWIN.module.plan(s["name"], shape, None)
            mem = ", ".join(f"{k} {v[0] // 1024}/{v[1] // 1024}K" for k, v in p["memory"].items())
            lines[f"tiling {s['name']}"] = (
                f"DeepSeek H=128 Dqk=576 Dv=512 K=2048 {shape['dtype']}: mTile={p['mTile']} nTile={p['nTile']} "
                f"dkChunk={p['dkChunk']} dvChunk={p['dvChunk']} buffers vec/kv/l0={p['vecBufNum']}/"
                f"{p['kvBufNum']}/{p['l0BufNum']} T=1: {p['numSplits']} candidate splits on {p['blockDim']} of "
                f"{s['aic']} cube cores | {mem}"
                + ("" if p["fits"] else f" | DOES NOT FIT: {p['problems']}"))
        return lines


BACKEND = AscendCBackend()
