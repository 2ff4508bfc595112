"""Backend declaration of the Triton kernels (ops, capabilities, priorities, availability).

One backend for the attention kernels (launch.py) and the selection kernels (selection.py).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, FrozenSet, List

from ...inputs import FLOAT_DTYPES
from ...registry import ATTENTION_FEATURES, KV_QUANT_FEATURES, Backend


def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e})"
    return ""


def triton_ascend_version() -> str:
    """The installed triton-ascend's version ('' when the installed triton is not Huawei's): it replaces
    the ``triton`` package (same import name) and compiles our kernels for Ascend NPUs."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("triton-ascend")
    except PackageNotFoundError:
        return ""


def npu_offered() -> bool:
    """triton-ascend is the installed triton and torch_npu is installed. Found by metadata, not by
    import: importing torch_npu without CANN breaks ``import torch`` (docs/traps.md)."""
    return bool(triton_ascend_version()) and importlib.util.find_spec("torch_npu") is not None


#: What `attention.info` says of the npu path; nothing of it has run on an NPU (docs/ascendc.md).
NPU_STATUS = "compile-checked on x86, never ran on an NPU"

#: Features the npu path does not offer, with the reason (declined on npu whatever the op; the
#: registry then takes the next backend). Ascend A2/A3 (910B, 910_93) have no FP8 type: triton-ascend
#: 3.2 stops at "unexpected type fp8" lowering any kernel with a float8_e4m3fn operand (make
#: triton-ascend-check, docs/triton.md "Ascend"). int8 caches and indexer inputs compile.
NPU_DECLINED = {
    "kv_fp8": "float8_e4m3fn cache on npu: Ascend A2/A3 have no FP8 type (triton-ascend 3.2: 'unexpected type fp8')",
    "fp8": "float8_e4m3fn q_idx/k_idx on npu: Ascend A2/A3 have no FP8 type (triton-ascend 3.2: 'unexpected type fp8')",
}


def _npu_declined(inp) -> list:
    """Why the npu path declines these inputs: NPU_DECLINED's features, and a latent int8 cache."""
    declined = [why for f, why in sorted(NPU_DECLINED.items()) if f in inp.features]
    if inp.op != "select" and getattr(inp, "v", 0) is None and "kv_int8" in inp.features:
        # make triton-ascend-check, dsv32-decode-64-int8 (bishengir-compile, 1068 s): "ub overflow"
        declined.append("int8 latent cache on npu: the latent kernel with its dequantized 16 x 512 tile needs "
                        "275.2 KiB of the 192 KiB UB")
    return declined


def interpreting() -> bool:
    """Triton decides at import time whether @triton.jit functions run in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    description = ("Triton kernels: heads of a kv group packed into tl.dot's M dimension, split-K "
                   "(flash-decoding) for few queries over many candidates; cuda, npu with triton-ascend "
                   f"({NPU_STATUS}), or cpu under TRITON_INTERPRET=1")
    # On the CPU the reference (0) stays first: the interpreter is for tests only. On npu the AscendC
    # backend (10) stays first: this path is compile-checked only (docs/triton.md "Ascend").
    priorities = {"cuda": 10, "cpu": 50, "npu": 20}
    ops = {
        # All of docs/spec.md section 1, quantized caches included (kv_fp8 / kv_int8: both forward kernels
        # dequantize the tiles they gather).
        "attention": ATTENTION_FEATURES,
        # backward.py; limits: backward.limit_reasons. Its kernels read float caches only: a quantized
        # kv / v (which gets no gradient) sends the backward to the reference.
        "attention_backward": ATTENTION_FEATURES - KV_QUANT_FEATURES,
        "lightning_indexer": frozenset({"contiguous", "paged", "varlen", "causal", "fp8", "int8", "window"}),
        "select": frozenset({"contiguous", "paged", "varlen", "causal", "block", "fp8", "int8", "window"}),
        "merge": frozenset(),  # merge.py (attention/merge.py's op)
    }
    dtypes = frozenset(FLOAT_DTYPES)

    def __init__(self):
        # Triton is imported lazily, not when `attention` is imported: whether its kernels run in the
        # interpreter is fixed at triton's import, and `python -m attention.tune --device cpu` must be
        # able to set TRITON_INTERPRET=1 after `attention` itself was imported.
        self._import_error = None if importlib.util.find_spec("triton") is not None else "triton is not installed"

    def unavailable_reasons(self) -> List[str]:
        if self._import_error is None:
            self._import_error = _triton_import_error()
        return [self._import_error] if self._import_error else []

    def device_types(self) -> FrozenSet[str]:
        # CPU tensors run only through the interpreter (tests); never a CPU production path. npu only
        # where triton-ascend is the installed triton and torch_npu is present (npu_offered).
        devs = {"cuda", "cpu"} if interpreting() else {"cuda"}
        if npu_offered():
            devs.add("npu")
        return frozenset(devs)

    def limit_reasons(self, inp) -> List[str]:
        # Launch-geometry limits (CUDA grid axes 1/2 hold at most 65535 programs; offsets inside a
        # candidate list are int32) and the selection kernels' block/k limits.
        if inp.op == "merge":  # the reference merges there: this kernel is checked on cuda only
            return ["merge not offered on npu"] if inp.device.type == "npu" else []
        declined = _npu_declined(inp) if inp.device.type == "npu" else []
        if inp.op in ("attention", "attention_backward"):
            from . import limits

            reasons = declined + limits.reasons(inp)
            if inp.op == "attention_backward":
                from .backward import limit_reasons, plan

                reasons += limit_reasons(inp)
                cap = limits.max_programs(inp.device.type)
                if cap is not None and not reasons:
                    # The backward's grid is not split (launch.token_chunks splits the forward's only).
                    n = inp.num_tokens * inp.num_kv_heads * plan(inp)["NUM_HB"]
                    if n > cap:
                        reasons.append(f"backward: T x kv heads x head blocks = {n} programs > {cap} per launch on "
                                       f"{inp.device.type} (its launch is not split)")
            return reasons
        from . import selection

        return declined + selection.limit_reasons(inp)

    def forward(self, inp):
        if inp.op == "attention":
            from .launch import forward

            return forward(inp)
        if inp.op == "merge":
            from .merge import merge_attention_states

            return merge_attention_states(inp.outs, inp.lses, inp.attn_sink)
        from .selection import LAUNCHER

        return LAUNCHER.run(inp)

    def backward(self, inp, out, lse, grad_out, grad_lse):
        from .backward import backward_op

        return backward_op(inp, out, lse, grad_out, grad_lse)

    def info(self) -> Dict[str, str]:
        if self.unavailable_reasons():
            return {}
        import triton

        from ...tuning import store_path

        lines = {"triton": triton.__version__, "interpreter": str(interpreting())}
        if triton_ascend_version():
            lines["triton-ascend"] = (f"{triton_ascend_version()}: npu "
                                      f"{'offered' if npu_offered() else 'not offered (torch_npu is not installed)'}; "
                                      f"{NPU_STATUS}; declined on npu: "
                                      + "; ".join(f"{f} ({why})" for f, why in sorted(NPU_DECLINED.items())))
        try:
            lines["tuning store"] = str(store_path())
        except Exception as e:  # pragma: no cover - info must never fail
            lines["tuning store"] = f"unavailable ({e})"
        return lines


BACKEND = TritonBackend()
