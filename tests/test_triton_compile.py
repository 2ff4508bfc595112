"""Compile the GPU kernels for sm_90 without a GPU (Triton's own ptxas), the only check CI has of the
non-interpreter path: the interpreter accepts code the compiler rejects, and cannot see spills.

The compile runs in a subprocess without TRITON_INTERPRET (this test process imports the kernels in
interpreter mode); as a script, this file compiles the variants and prints one JSON line each.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, dtype, constexpr overrides, num_warps, num_stages)
VARIANTS = [
    # The shipped Hopper default on the DeepSeek decode shape: paged, varlen, causal, sink, split-K.
    ("deepseek_decode_h200_default", "bf16", dict(SPLIT=True), 8, 2),
    # Prefill shape: contiguous, one sequence, no split.
    ("deepseek_prefill_h200_default", "bf16", dict(SPLIT=False, PAGED=False, VARLEN=False, HAS_CUK=False), 8, 2),
    # float32 inputs: the ieee dot branch; odd widths with rope and block selection; MHA group of 1.
    ("float32_odd_widths_rope_block", "fp32",
     dict(F32_DOT=True, HG=1, DQK=24, DV=20, DR=12, BLOCK_SIZE=4, BLOCK_H=16, BLOCK_DV=32, NUM_HB=1, NUM_DVB=1,
          BLOCK_D=16, BLOCK_DR=16), 4, 2),
    ("float16_separate_v_gqa", "fp16", dict(HG=4, DQK=128, DV=128, BLOCK_H=16, BLOCK_DV=128, NUM_HB=1, NUM_DVB=1), 4, 2),
]

BASE = dict(HG=128, DQK=576, DV=512, DR=0, BLOCK_SIZE=1, PAGE_SIZE=64, VARLEN=True, HAS_CUK=False, PAGED=True,
            CAUSAL=True, HAS_SINK=True, SPLIT=False, SEARCH_STEPS=8, F32_DOT=False, NUM_HB=2, NUM_DVB=2,
            BLOCK_H=64, BLOCK_N=32, BLOCK_D=64, BLOCK_DR=16, BLOCK_DV=256)


def _compile_all():  # runs in the subprocess
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(ROOT))
    from attention.backends.triton import kernels as K

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

    def usage(k):
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        try:
            out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        finally:
            os.unlink(f.name)
        m = re.search(r"REG:(\d+) STACK:(\d+)", out)
        return (int(m.group(1)), int(m.group(2))) if m else (None, None)

    def sig(fn, consts, ptrs):
        return {n: ("constexpr" if n in consts else ptrs.get(n, "fp32" if n == "sm_scale_log2" else "i32"))
                for n in fn.arg_names}

    target = GPUTarget("cuda", 90, 32)
    for name, dt, over, warps, stages in VARIANTS:
        consts = dict(BASE, **over)
        ptrs = {n: f"*{dt}" for n in ("Q", "KV", "V", "QR", "KVR", "OUT")}
        ptrs.update(IDX="*i32", SINK="*fp32", BT="*i32", CUQ="*i32", CUK="*i32", SEQK="*i32", LSE="*fp32",
                    OPART="*fp32", LPART="*fp32")
        fn = K.selective_attention_fwd_kernel
        k = triton.compile(ASTSource(fn=fn, signature=sig(fn, consts, ptrs), constexprs=consts), target=target,
                           options=dict(num_warps=warps, num_stages=stages))
        regs, stack = usage(k)
        print(json.dumps(dict(name=name, shared=k.metadata.shared, regs=regs, stack=stack)), flush=True)
    fn = K.selective_attention_combine_kernel
    consts = dict(DV=512, HAS_SINK=True, BLOCK_H=16, BLOCK_DV=128)
    ptrs = dict(OPART="*fp32", LPART="*fp32", SINK="*fp32", OUT="*bf16", LSE="*fp32")
    k = triton.compile(ASTSource(fn=fn, signature=sig(fn, consts, ptrs), constexprs=consts), target=target,
                       options=dict(num_warps=4))
    regs, stack = usage(k)
    print(json.dumps(dict(name="combine", shared=k.metadata.shared, regs=regs, stack=stack)), flush=True)


def test_kernels_compile_for_sm90_without_spills():
    import pytest

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # a fresh compile every time, and no shared cache written
        r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {d["name"]: d for d in map(json.loads, r.stdout.strip().splitlines())}
    assert set(rows) == {v[0] for v in VARIANTS} | {"combine"}
    # Hopper has 228 KiB of shared memory per SM (227 KiB per block).
    for d in rows.values():
        assert d["shared"] <= 227 * 1024, d
    # The shipped H200/H100 default must not spill registers (a spill costs more than any tile win).
    for name in ("deepseek_decode_h200_default", "deepseek_prefill_h200_default"):
        assert rows[name]["stack"] == 0, rows[name]


if __name__ == "__main__":
    _compile_all()
