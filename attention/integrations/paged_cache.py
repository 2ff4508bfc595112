"""A paged latent (MLA) cache: the storage that ``selective_attention``'s paged latent mode reads.

One ``PagedLatentCache`` holds one attention layer of a batch of sequences. Each token stores only
what MLA needs to rebuild keys and values on the fly: its compressed latent ``c`` (``kv_lora_rank``
values, the key *and* the value in latent mode) and its shared rope key (``rope_dim`` values), e.g.
512 + 64 = 576 values for DeepSeek-V3/V3.2 instead of ``H * (qk_head_dim + v_head_dim)`` for per-head K
and V.

Layout (docs/spec.md section 1, paged kv): ``kv [P, page_size, 1, kv_lora_rank]``,
``kv_rope [P, page_size, 1, rope_dim]``, ``block_table [B, max_pages] int32`` (-1 = no page yet),
``seqlens_k [B] int32``. Pages come from one pool per cache; a sequence takes a new page only when
its last one is full, so a batch of ragged sequences wastes at most ``page_size - 1`` rows each.

A quantized cache (docs/contract.md "Quantized caches"): ``dtype=torch.float8_e4m3fn`` or ``torch.int8`` stores the latent
quantized on ``append`` (``attention.quantize_kv``: per token, tiles of ``scale_block`` values, amax
scaling) with ``kv_scale [P, page_size, 1, ceil(kv_lora_rank / scale_block)]`` float32 beside it; the
rope part stays floating point in ``rope_dtype`` (it must be the queries' dtype; default bfloat16).
DeepSeek's 512 + 64 row then takes 512 + 16 + 128 = 656 bytes (FlashMLA's V3.2 record) instead of 1152.

Use outside transformers::

    cache = PagedLatentCache(batch_size=2, kv_lora_rank=512, rope_dim=64, page_size=64)
    cache.append(latent, rope, lengths=[5, 3])     # latent [8, 512], rope [8, 64]: 5 rows of seq 0, 3 of seq 1
    out = attention.selective_attention(q_latent, indices=idx, q_rope=q_rope, d_v=512, sm_scale=s,
                                        cu_seqlens_q=cu_q, causal=True, **cache.attention_kwargs())
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..api import quantize_kv
from ..inputs import FLOAT_DTYPES, QUANT_DTYPES, KVLayout, dtype_name, need_int
from python_ref import dequantize, num_scales


class PagedLatentCache:
    """Paged storage of MLA latents for ``batch_size`` sequences (one attention layer)."""

    def __init__(self, batch_size: int, kv_lora_rank: int, rope_dim: int, *, page_size: int = 64,
                 initial_pages: int = 0, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu", scale_block: int = 128,
                 rope_dtype: Optional[torch.dtype] = None):
        if batch_size < 1 or kv_lora_rank < 1 or rope_dim < 0 or page_size < 1:
            raise ValueError(f"PagedLatentCache: batch_size {batch_size}, kv_lora_rank {kv_lora_rank}, "
                             f"rope_dim {rope_dim} and page_size {page_size} must be positive")
        if dtype not in FLOAT_DTYPES and dtype not in QUANT_DTYPES:
            raise TypeError(f"PagedLatentCache: dtype must be one of "
                            f"{[dtype_name(d) for d in FLOAT_DTYPES + tuple(QUANT_DTYPES)]}, got {dtype!r}")
        need_int("scale_block", scale_block, lo=1)
        self.quantized = dtype in QUANT_DTYPES
        if rope_dtype is None:
            rope_dtype = torch.bfloat16 if self.quantized else dtype
        if rope_dtype not in FLOAT_DTYPES:
            raise TypeError(f"PagedLatentCache: rope_dtype must be float32, float16 or bfloat16, got {rope_dtype!r}")
        self.batch_size = batch_size
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.page_size = page_size
        self.dtype = dtype
        self.rope_dtype = rope_dtype
        self.scale_block = scale_block
        self.device = torch.device(device)
        self.kv = torch.empty(initial_pages, page_size, 1, kv_lora_rank, dtype=dtype, device=self.device)
        self.kv_rope = torch.empty(initial_pages, page_size, 1, rope_dim, dtype=rope_dtype, device=self.device)
        # The tile scales of a quantized latent (None for a float cache).
        self.kv_scale = (torch.empty(initial_pages, page_size, 1, num_scales(kv_lora_rank, scale_block),
                                     dtype=torch.float32, device=self.device) if self.quantized else None)
        self._free: List[int] = list(range(initial_pages))
        # Lengths and page lists live on the host too: allocation decisions then never wait on a device.
        self._lengths: List[int] = [0] * batch_size
        self._pages: List[List[int]] = [[] for _ in range(batch_size)]
        self.block_table = torch.full((batch_size, 0), -1, dtype=torch.int32, device=self.device)
        self.seqlens_k = torch.zeros(batch_size, dtype=torch.int32, device=self.device)

    # ---- sizes ----
    @property
    def lengths(self) -> List[int]:
        return list(self._lengths)

    @property
    def num_pages(self) -> int:
        return self.kv.shape[0]

    def memory_bytes(self) -> int:
        """Bytes held by the page pool (allocated pages, used or free), block table and lengths."""
        t = (self.kv, self.kv_rope, self.kv_scale, self.block_table, self.seqlens_k)
        return sum(x.numel() * x.element_size() for x in t if x is not None)

    def used_bytes(self) -> int:
        """Bytes of the pages that sequences hold (a partly filled last page counts whole)."""
        pages = sum(len(p) for p in self._pages)
        row = self.kv_lora_rank * self.kv.element_size() + self.rope_dim * self.kv_rope.element_size()
        if self.kv_scale is not None:
            row += self.kv_scale.shape[-1] * self.kv_scale.element_size()
        return pages * self.page_size * row

    # ---- writing ----
    def _grow_pool(self, need: int) -> None:
        # Grow by at least 1/8 of the pool: amortised O(1) copying per token, yet at most ~12% of the
        # pool idle (doubling would leave up to half of it unused). Serving code that knows its budget
        # passes initial_pages and never grows.
        old = self.num_pages
        add = max(need, -(-old // 8), 1)
        shape = (add, self.page_size, 1)
        self.kv = torch.cat([self.kv, self.kv.new_empty(shape + (self.kv_lora_rank,))])
        self.kv_rope = torch.cat([self.kv_rope, self.kv_rope.new_empty(shape + (self.rope_dim,))])
        if self.kv_scale is not None:
            self.kv_scale = torch.cat([self.kv_scale, self.kv_scale.new_empty(shape + (self.kv_scale.shape[-1],))])
        self._free.extend(range(old, old + add))

    def append(self, latent: Tensor, rope: Tensor, lengths: Optional[Sequence[int]] = None) -> None:
        """Append rows to the sequences' ends.

        latent [N, kv_lora_rank] (or [N, 1, kv_lora_rank]), rope [N, rope_dim] likewise; ``lengths[b]``
        rows belong to sequence b, in batch order (default: N / batch_size each). Sequences may get
        zero rows (a padded slot in a decode step). A quantized cache quantizes the new rows only.
        """
        latent = latent.reshape(latent.shape[0], self.kv_lora_rank)
        rope = rope.reshape(rope.shape[0], self.rope_dim)
        n = latent.shape[0]
        if rope.shape[0] != n:
            raise ValueError(f"append: latent has {n} rows but rope has {rope.shape[0]}")
        if lengths is None:
            if n % self.batch_size:
                raise ValueError(f"append: {n} rows do not split evenly over {self.batch_size} sequences; "
                                 "pass lengths=")
            lengths = [n // self.batch_size] * self.batch_size
        lengths = [int(x) for x in lengths]
        if len(lengths) != self.batch_size or sum(lengths) != n or min(lengths) < 0:
            raise ValueError(f"append: lengths {lengths} must be {self.batch_size} counts >= 0 summing to {n}")

        # Host-side allocation (no device reads); the new table entries go in with one indexed write.
        new_b: List[int] = []
        new_slot: List[int] = []
        new_page: List[int] = []
        for b, m in enumerate(lengths):
            if m == 0:
                continue
            end = self._lengths[b] + m
            pages_needed = -(-end // self.page_size) - len(self._pages[b])
            if pages_needed > len(self._free):
                self._grow_pool(pages_needed - len(self._free))
            for _ in range(pages_needed):
                new_b.append(b)
                new_slot.append(len(self._pages[b]))
                new_page.append(self._free.pop(0))
                self._pages[b].append(new_page[-1])
        width = max((len(p) for p in self._pages), default=0)
        if width > self.block_table.shape[1]:
            # Widen by doubling so a decode loop re-allocates the table O(log L) times, not per page.
            grow = max(width, 2 * self.block_table.shape[1]) - self.block_table.shape[1]
            pad = torch.full((self.batch_size, grow), -1, dtype=torch.int32, device=self.device)
            self.block_table = torch.cat([self.block_table, pad], dim=1)
        if new_b:
            self.block_table[torch.tensor(new_b), torch.tensor(new_slot)] = torch.tensor(
                new_page, dtype=torch.int32).to(self.device)
        if n:
            counts = torch.tensor(lengths, device=self.device)
            b_idx = torch.repeat_interleave(torch.arange(self.batch_size, device=self.device), counts)
            first = torch.cumsum(counts, 0) - counts
            old = torch.tensor(self._lengths, device=self.device)
            pos = old[b_idx] + torch.arange(n, device=self.device) - first[b_idx]
            page = self.block_table[b_idx, pos // self.page_size].long()
            row = pos % self.page_size
            if self.quantized:
                latent, scale = quantize_kv(latent, self.dtype, self.scale_block)
                self.kv_scale[page, row, 0] = scale
            self.kv[page, row, 0] = latent.to(self.dtype)
            self.kv_rope[page, row, 0] = rope.to(self.rope_dtype)
        for b, m in enumerate(lengths):
            self._lengths[b] += m
        self.seqlens_k = torch.tensor(self._lengths, dtype=torch.int32, device=self.device)

    def reset(self) -> None:
        """Forget every sequence; the pages stay allocated for reuse."""
        self._free = list(range(self.num_pages))
        self._lengths = [0] * self.batch_size
        self._pages = [[] for _ in range(self.batch_size)]
        self.block_table = torch.full((self.batch_size, 0), -1, dtype=torch.int32, device=self.device)
        self.seqlens_k = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)

    # ---- reading ----
    def layout(self) -> KVLayout:
        """This cache's sequences as the ops see them (paged: block_table + seqlens_k)."""
        return KVLayout(paged=True, block_table=self.block_table, seqlens_k=self.seqlens_k,
                        num_seqs=self.batch_size)

    def attention_kwargs(self) -> dict:
        """The keyword arguments of ``selective_attention`` that describe this cache (latent mode)."""
        kw = {"kv": self.kv, "kv_rope": self.kv_rope, "d_v": self.kv_lora_rank, **self.layout().kwargs()}
        if self.quantized:
            kw.update(kv_scale=self.kv_scale, scale_block=self.scale_block)
        return kw

    def gather(self, b: int) -> tuple:
        """Sequence b's rows, contiguous ([L, kv_lora_rank], [L, rope_dim]): for tests and debugging.
        A quantized latent comes back dequantized (float32), the values the op reads."""
        n = self._lengths[b]
        pages = torch.tensor(self._pages[b], dtype=torch.long, device=self.device)
        lat = self.kv[pages]
        if self.quantized:
            lat = dequantize(lat, self.kv_scale[pages], self.scale_block)
        lat = lat.reshape(-1, self.kv_lora_rank)[:n]
        rope = self.kv_rope[pages].reshape(-1, self.rope_dim)[:n]
        return lat, rope
