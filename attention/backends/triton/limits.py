"""Shape limits of the Triton launch, checked from shapes only (no triton import needed)."""

from __future__ import annotations

from typing import List, Optional

# CUDA grids allow 2**31 - 1 programs on axis 0 (query tokens) but 65535 on axes 1 and 2.
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1
MAX_CANDIDATES = 2**31 - 1 - 4096  # candidate offsets (K * block_size) are int32 inside the kernel
# Programs one launch may start, all grid axes together, per device type (absent: no such limit).
# triton-ascend 3.2.0 refuses more than 65535 on an NPU: triton/runtime/jit.py, JITFunction.run,
# `if grid_all_size > 65535: raise RuntimeError("grid should be less than 65536! ...")` with
# grid_all_size = grid[0] * grid[1] * grid[2] (lifted only by TRITON_ALL_BLOCKS_PARALLEL=1, which
# makes every program run in one parallel round: its docs say so, not measured). The forward and
# selection launchers split their token axis into launches under it (launch.token_chunks); the
# backward is declined over it (backend.limit_reasons), and so are inputs whose one token needs more
# programs than that (reasons).
MAX_PROGRAMS = {"npu": 65535}


def max_programs(device_type: str) -> Optional[int]:
    return MAX_PROGRAMS.get(device_type)


def reasons(inp) -> List[str]:
    out = []
    if inp.num_tokens > MAX_GRID_X:
        out.append(f"T={inp.num_tokens} query tokens > {MAX_GRID_X} (grid axis 0)")
    # The launch plan (launch.py) grows head blocks up to 128 heads and value blocks up to 512 columns
    # until the grid fits; inputs whose grid is too tall even then cannot launch.
    heads_per_kv = inp.num_heads // inp.num_kv_heads
    y = inp.num_kv_heads * -(-heads_per_kv // 128) * -(-inp.d_v // 512)
    if y > MAX_GRID_Y:
        out.append(f"Hkv x head blocks x value blocks = {y} > {MAX_GRID_Y} (grid axis 1)")
    cap = max_programs(inp.device.type)
    if cap is not None and y > cap:  # one token's programs must fit one launch (split counts are capped)
        out.append(f"Hkv x head blocks x value blocks = {y} > {cap} programs per launch on {inp.device.type}")
    if inp.topk * inp.block_size > MAX_CANDIDATES:
        out.append(f"K * block_size = {inp.topk * inp.block_size} candidates > {MAX_CANDIDATES} (int32 offsets)")
    return out
