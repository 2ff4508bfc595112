"""Quantized kv caches (docs/contract.md "Quantized caches"): the quantizer and the dequantization rule.

A quantized cache row stores ``D`` values in ``float8_e4m3fn`` or ``int8`` and one float32 scale per
tile of ``scale_block`` consecutive columns (the last tile may be shorter): the value of column c is
``float(stored[c]) * scale[c // scale_block]``. This is FlashMLA's V3.2 FP8 layout (512 e4m3 values,
4 tiles of 128) and Ascend's "C8" int8 cache with per-token, per-tile scales.

Both functions take validated arguments (``attention.quantize_kv`` validates).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

__all__ = ["QUANT_MAX", "num_scales", "quantize_kv", "dequantize", "scale_tiles_", "stored_values"]

#: Largest magnitude each storage dtype holds (e4m3fn: 448, no inf; int8: symmetric [-127, 127], so
#: that -x is always representable and the grid is the same on both sides of 0).
QUANT_MAX: Dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}


def num_scales(width: int, scale_block: int) -> int:
    """Scales per row: ceil(width / scale_block)."""
    return -(-int(width) // int(scale_block))


_FP8_TABLE: Dict[torch.dtype, Tensor] = {}  # CPU tables, by the dtype they convert to
#: Elements read through the table per step: its int32 index is a 16 MiB temporary at most, not 4 bytes
#: per element of the whole tensor (an 80 MB index for a 20M-element gather). Smaller slices cost one
#: parallel region each, which measured slower with two threads (docs/architecture.md, "float8 reads").
FP8_TABLE_SLICE = 1 << 22
#: Below this many elements ``.to`` is faster (the table's fixed cost, ~0.03 ms, is more than it saves).
FP8_TABLE_MIN = 8192


def stored_values(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``float(stored)`` of every element of a quantized (or any) tensor, in ``dtype``: a new tensor.

    On the CPU, PyTorch's float8 -> float conversion runs element by element, a few ns each: a float8
    tensor is read through a table of its 256 values instead (``index_select`` of its bytes as int32,
    ``FP8_TABLE_SLICE`` elements at a time into the output), the same values bit for bit (NaN codes
    included). Measured (docs/architecture.md, "float8 reads"): 1.6-4x faster than ``.to`` from 16K to
    16M elements on one thread, as fast or faster with two; slower below ``FP8_TABLE_MIN``. Plain CPU tensors only: traced or fake tensors take ``.to`` (no global table
    made of fake tensors).
    """
    if (x.dtype == torch.float8_e4m3fn and x.device.type == "cpu" and x.numel() >= FP8_TABLE_MIN
            and type(x) is torch.Tensor and not torch.compiler.is_compiling()):
        # One table per target dtype, made by the conversion it replaces: each code's bits are
        # ``.to(dtype)``'s by construction (a float32 table converted again would change NaN's bits).
        table = _FP8_TABLE.get(dtype)
        if table is None:
            codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
            table = _FP8_TABLE.setdefault(dtype, codes.view(torch.float8_e4m3fn).to(dtype))
        y = torch.empty(x.shape, dtype=dtype)
        src, dst = x.reshape(-1).view(torch.uint8), y.view(-1)
        for s in range(0, src.numel(), FP8_TABLE_SLICE):
            torch.index_select(table, 0, src[s:s + FP8_TABLE_SLICE].to(torch.int32), out=dst[s:s + FP8_TABLE_SLICE])
        return y
    return x.to(dtype)


def scale_tiles_(x: Tensor, scale: Tensor, scale_block: int) -> Tensor:
    """In place: ``x[..., c] *= scale[..., c // scale_block]`` (x [..., D], scale [..., ceil(D / b)]).

    One multiplication over the whole tiles seen as [..., n, b] and one for a shorter last tile: no
    [..., D] expansion of the scales is ever built, so the memory is that of ``x`` alone.
    """
    D = x.shape[-1]
    full = D // scale_block
    if full:
        x[..., :full * scale_block].unflatten(-1, (full, scale_block)).mul_(scale[..., :full, None])
    if full * scale_block < D:
        x[..., full * scale_block:].mul_(scale[..., full:full + 1])
    return x


def dequantize(x: Tensor, scale: Tensor, scale_block: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values of a quantized tensor in ``dtype`` (a new tensor): float(stored) * scale of its tile."""
    return scale_tiles_(stored_values(x, dtype), scale.to(dtype), scale_block)


def quantize_kv(kv: Tensor, dtype: torch.dtype, scale_block: int = 128) -> Tuple[Tensor, Tensor]:
    """(kv_q [..., D] in ``dtype``, kv_scale [..., ceil(D / scale_block)] float32) of a float tensor.

    Per row and per tile of ``scale_block`` columns: amax scaling, scale = amax / QUANT_MAX[dtype]
    (1 for an all-zero tile, so that it stores zeros and dequantizes to exact zeros); stored =
    x / scale rounded to the nearest representable value (ties to even: ``torch.round`` for int8, the
    float8 conversion for e4m3), saturated at +-QUANT_MAX (x / scale can exceed it by a rounding
    error of the division). Computed in float32 whatever ``kv``'s dtype. A tile holding NaN or inf
    gets a NaN / inf scale, so the whole tile dequantizes to non-finite values (int8 stores 0 there).
    """
    qmax = QUANT_MAX[dtype]
    D = kv.shape[-1]
    n = num_scales(D, scale_block)
    x = kv.detach().to(torch.float32)
    pad = n * scale_block - D
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))  # zeros do not change a tile's amax
    tiles = x.unflatten(-1, (n, scale_block))
    amax = tiles.abs().amax(dim=-1)  # NaN propagates into the scale
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / qmax)
    y = (tiles / scale[..., None]).clamp_(-qmax, qmax)
    if dtype == torch.int8:
        y = torch.nan_to_num_(torch.round_(y), nan=0.0)  # int8 has no NaN: the scale carries it
    y = y.flatten(-2)[..., :D].to(dtype)
    return y, scale.contiguous()
