"""Shape limits of the Triton launch, checked from shapes only (no triton import needed)."""

from __future__ import annotations

from typing import List

# CUDA grids allow 2**31 - 1 programs on axis 0 (query tokens) but 65535 on axes 1 and 2.
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1
MAX_CANDIDATES = 2**31 - 1 - 4096  # candidate offsets (K * block_size) are int32 inside the kernel


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
    if inp.topk * inp.block_size > MAX_CANDIDATES:
        out.append(f"K * block_size = {inp.topk * inp.block_size} candidates > {MAX_CANDIDATES} (int32 offsets)")
    return out
