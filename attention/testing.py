"""The equivalence matrix: named cases of docs/spec.md section 1, the float64 oracle, tolerances.

Shipped inside the package (not only in tests/) because ``python -m attention.verify`` runs it on a
machine that only ``pip install``ed us. Every case builds its inputs deterministically from its name,
rounds them to the dtype under test, and is compared with ``python_ref.selective_attention_dense``
evaluated in float64 on the CPU from those same rounded inputs.

Garbage that must never be read is planted on purpose: rows of a contiguous cache past the last
sequence and every page no sequence needs hold NaN, and block tables are padded with -1.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import python_ref

from .inputs import dtype_name

# docs/spec.md section 4: max |out - ref| and max |lse - ref| per dtype.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 1e-2),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {d: dtype_name(d) for d in DTYPES}
DTYPES_BY_NAME: Dict[str, torch.dtype] = {n: d for d, n in DTYPE_NAMES.items()}  # "bfloat16" -> torch.bfloat16
#: ``Case.kv_quant`` names -> the storage dtype of the quantized cache
QUANT_DTYPES_BY_NAME: Dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


@dataclass(frozen=True)
class Case:
    """One point of the matrix. Sequences are (query tokens, kv length) pairs."""

    name: str
    seqs: Tuple[Tuple[int, int], ...] = ((3, 40),)
    H: int = 4
    Hkv: int = 1
    Dqk: int = 32
    Dv: Optional[int] = 16  # latent: d_v (None = whole row); separate: v's width
    latent: bool = True
    Dr: int = 0
    K: int = 12
    block_size: int = 1
    page_size: int = 0  # 0 = contiguous cache
    causal: bool = False
    sink: bool = False
    shared_indices: bool = False  # indices [T, 1, K]
    index_mode: str = "mixed"  # "mixed" (some out of range / negative), "valid", "dup", "none_valid"
    sm_scale: Optional[float] = None
    index_dtype: torch.dtype = torch.int32
    strided: bool = False
    varlen_api: bool = False  # pass cu_seqlens even for one sequence
    tags: Tuple[str, ...] = field(default=())
    # (sequence, logical position, value): that key/value row (every column of kv, v, kv_rope) holds
    # the value, e.g. NaN; the tokens that keep it must see NaN, the others must not see it at all.
    poison: Tuple[Tuple[int, int, float], ...] = ()
    indices_k_outer: bool = False  # indices a [T, K, G] tensor transposed: K is not the innermost axis
    table_pad: int = 1  # padding columns of -1 in the block table (0 with all-empty sequences: no column)
    # A quantized cache: "fp8" (float8_e4m3fn) or "int8" kv (and separate v), quantized by
    # attention.quantize_kv from the float32 values, with tiles of scale_block columns. Garbage rows
    # (NaN) get NaN scales: a kernel that reads a dropped row's scale fails the comparison.
    kv_quant: Optional[str] = None
    scale_block: int = 128
    # A uniform workload (made by :func:`Problem`: ``index_mode="selector"``): its family (problems of
    # one family differ only in context), the dtype its inputs are made in, a note for reports, and
    # the op it describes ("attention"; "select" / "indexer": H, Dqk, K are Hi, Di, k).
    family: str = ""
    dtype: str = "float32"
    description: str = ""
    op: str = "attention"

    @property
    def T(self) -> int:
        return sum(lq for lq, _ in self.seqs)

    # ---- a uniform problem's shape (every sequence holds the same (q_per_seq, context) pair) ----
    @property
    def batch(self) -> int:
        return len(self.seqs)

    @property
    def q_per_seq(self) -> int:
        return self.seqs[0][0] if self.seqs else 0

    @property
    def context(self) -> int:
        return self.seqs[0][1] if self.seqs else 0

    @property
    def G(self) -> int:
        """Index groups (rows of indices per token)."""
        return 1 if self.shared_indices else self.Hkv

    @property
    def heads_per_kv(self) -> int:
        return self.H // self.Hkv

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES_BY_NAME[self.dtype]

    def describe(self) -> str:
        if self.op != "attention":  # the indexer's names for H, Dqk, K
            return (f"T={self.T}, L={self.context}, Hi={self.H}, Di={self.Dqk}, k={self.K}, "
                    f"{'causal, ' if self.causal else ''}{self.dtype}")
        mode = "latent" if self.latent else "separate v"
        cache = f"paged({self.page_size})" if self.page_size else "contiguous"
        sel = f"K={self.K}" + (f" blocks of {self.block_size}" if self.block_size > 1 else "")
        rope = f"+{self.Dr}" if self.Dr else ""
        quant = f", kv {self.kv_quant}" if self.kv_quant else ""
        return (f"B={self.batch} x {self.q_per_seq} tok, L={self.context}, H={self.H}/Hkv={self.Hkv}, "
                f"Dqk={self.Dqk}{rope} Dv={self.Dv} {mode}, {sel}, {cache}, "
                f"{'causal, ' if self.causal else ''}{self.dtype}{quant}")

    def workload(self) -> Dict[str, object]:
        """The arguments of :func:`Problem` that rebuild this uniform problem."""
        d = {k: getattr(self, k) for k in _WORKLOAD_FIELDS}
        d.update({k: getattr(self, k) for k in _WORKLOAD_EXTRAS if getattr(self, k) != _CASE_DEFAULTS[k]})
        return d

    def as_dict(self) -> Dict[str, object]:
        """A uniform problem as a report row (JSON-ready)."""
        d = {k: getattr(self, k) for k in _WORKLOAD_FIELDS}
        d["name"] = self.name
        d["T"] = self.T
        return d

    def with_overrides(self, **kw) -> "Case":
        """This uniform problem with the given fields replaced (None = keep)."""
        return Problem(**{**self.workload(), **{k: v for k, v in kw.items() if v is not None}})

    def make(self, dtype: Optional[torch.dtype] = None, device="cpu", seed: Optional[int] = None) -> Dict[str, object]:
        """Keyword arguments of ``attention.selective_attention`` (q, kv, indices included), in ``dtype``
        (default: the case's own). A uniform problem (``index_mode="selector"``) is made by
        :meth:`make_logical` from ``seed`` (default 0); a matrix case from its name."""
        if self.index_mode == "selector":
            p = self if dtype is None else replace(self, dtype=dtype_name(dtype))
            return p.make_logical(device, 0 if seed is None else seed)[0]
        dtype = self.torch_dtype if dtype is None else dtype
        # One generator seeded from the name, drawn from in a fixed order (q, q_rope, cache, indices,
        # sink): a case's inputs never change when another case is added.
        g = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        q = torch.randn(self.T, self.H, self.Dqk, generator=g)
        q_rope = torch.randn(self.T, self.H, self.Dr, generator=g) if self.Dr else None
        widths = [self.Dqk] + ([self.Dr] if self.Dr else []) + ([] if self.latent else [self.Dv])
        args: Dict[str, object] = {}
        stores = self._paged_stores(g, widths, args) if self.page_size else self._contiguous_stores(g, widths, args)
        self._plant_poison(stores, args)
        indices = self._indices(g)
        sink = torch.randn(self.H, generator=g) if self.sink else None

        def cast(x, float_dtype=True):
            if x is None:
                return None
            if float_dtype:
                x = x.to(dtype)
            if self.strided:  # same values, non-contiguous storage
                x = torch.cat([x, x], dim=-1)[..., : x.shape[-1]]
            return x.to(device)

        def quantized(x, scale_name):
            # Quantized from the float32 values (q's dtype does not matter to the cache); the scales
            # are made non-contiguous too when ``strided`` (kernels use every stride of a scale).
            from .api import quantize_kv  # local: testing is importable without the package's backends

            xq, scale = quantize_kv(x, QUANT_DTYPES_BY_NAME[self.kv_quant], self.scale_block)
            args[scale_name] = cast(scale, float_dtype=False)
            args["scale_block"] = self.scale_block
            return cast(xq, float_dtype=False)

        def cache(x, scale_name):
            return cast(x) if self.kv_quant is None else quantized(x, scale_name)

        args.update(q=cast(q), kv=cache(stores[0], "kv_scale"), indices=indices.to(device),
                    v=None if self.latent else cache(stores[-1], "v_scale"), q_rope=cast(q_rope),
                    kv_rope=cast(stores[1]) if self.Dr else None,
                    attn_sink=None if sink is None else sink.to(device),
                    block_size=self.block_size, causal=self.causal)
        if self.latent and self.Dv is not None:
            args["d_v"] = self.Dv
        if self.sm_scale is not None:
            args["sm_scale"] = self.sm_scale
        for k in ("cu_seqlens_q", "cu_seqlens_k", "block_table", "seqlens_k"):
            if k in args:
                args[k] = args[k].to(device)
        return {k: v for k, v in args.items() if v is not None}

    def _lens(self) -> List[int]:
        return [lk for _, lk in self.seqs]

    def _paged_stores(self, g, widths, args) -> List[torch.Tensor]:
        """Page pools (one per width) behind a shuffled block table; unused pages and rows past each
        sequence's end hold NaN. Sets block_table, seqlens_k (and cu_seqlens_q) in ``args``."""
        B, lens = len(self.seqs), self._lens()
        P_needed = [math.ceil(lk / self.page_size) for lk in lens]
        spare = 3  # unused pages, filled with NaN
        P = sum(P_needed) + spare
        perm = torch.randperm(P, generator=g)
        max_pages = max(P_needed) + self.table_pad  # padding columns of -1
        table = torch.full((B, max_pages), -1, dtype=torch.int32)
        k = 0
        for b in range(B):
            for j in range(P_needed[b]):
                table[b, j] = int(perm[k])
                k += 1
        stores = []
        for w in widths:
            x = torch.full((P, self.page_size, self.Hkv, w), float("nan"))
            for b in range(B):
                for j in range(P_needed[b]):
                    pg = int(table[b, j])
                    x[pg] = torch.randn(self.page_size, self.Hkv, w, generator=g)
                    # rows of the last page past the sequence end are garbage too
                    tail = lens[b] - j * self.page_size
                    if tail < self.page_size:
                        x[pg, max(tail, 0):] = float("nan")
            stores.append(x)
        args["block_table"] = table
        args["seqlens_k"] = torch.tensor(lens, dtype=torch.int32)
        if B > 1 or self.varlen_api:
            args["cu_seqlens_q"] = _cu([lq for lq, _ in self.seqs])
        return stores

    def _contiguous_stores(self, g, widths, args) -> List[torch.Tensor]:
        """Packed caches (one per width); with cu_seqlens_k, 5 NaN rows past the last sequence, without,
        S is the length. Sets cu_seqlens_q/k in ``args`` for several sequences (or ``varlen_api``)."""
        lens = self._lens()
        with_cu = len(self.seqs) > 1 or self.varlen_api
        S = sum(lens) + (5 if with_cu else 0)
        stores = []
        for w in widths:
            x = torch.randn(S, self.Hkv, w, generator=g)
            x[sum(lens):] = float("nan")
            stores.append(x)
        if with_cu:
            args["cu_seqlens_q"] = _cu([lq for lq, _ in self.seqs])
            args["cu_seqlens_k"] = _cu(lens)
        return stores

    def _plant_poison(self, stores, args) -> None:
        lens = self._lens()
        for b, p, val in self.poison:
            for x in stores:
                if self.page_size:
                    x[int(args["block_table"][b, p // self.page_size]), p % self.page_size] = val
                else:
                    x[sum(lens[:b]) + p] = val

    def _indices(self, g) -> torch.Tensor:
        """[T, G, K] indices per ``index_mode`` (G = 1 with shared indices, else Hkv)."""
        G = 1 if self.shared_indices else self.Hkv
        idx_rows = []
        for lq, lk in self.seqs:
            n_units = max(1, math.ceil(lk / self.block_size))
            if self.index_mode == "valid":
                r = torch.randint(0, n_units, (lq, G, self.K), generator=g)
            elif self.index_mode == "dup":
                base = torch.randint(0, n_units, (lq, G, max(1, self.K // 3)), generator=g)
                r = base.repeat(1, 1, 3)[..., :self.K]
            elif self.index_mode == "none_valid":
                r = torch.where(torch.rand(lq, G, self.K, generator=g) < 0.5,
                                torch.full((lq, G, self.K), -1), torch.full((lq, G, self.K), n_units + 7))
            else:  # mixed: mostly valid, some negative, some past the end
                r = torch.randint(-2, n_units + 3, (lq, G, self.K), generator=g)
            idx_rows.append(r)
        indices = torch.cat(idx_rows) if idx_rows else torch.zeros(0, G, self.K, dtype=torch.int64)
        indices = indices.to(self.index_dtype)
        if self.indices_k_outer:  # same values, K axis outermost in memory (a transposed topk)
            indices = indices.transpose(1, 2).contiguous().transpose(1, 2)
        return indices


    def make_logical(self, device="cpu", seed: int = 0):
        """``(kwargs, kv_log, kvr_log, v_log)``: keyword arguments of ``selective_attention`` and the
        logical (unpaged, ``[batch, context, Hkv, D]``) views of the same cache values (with
        ``kv_quant``, the dequantized values in float32: what the op reads)."""
        p = self
        dev = torch.device(device)
        dt = p.torch_dtype
        gen = torch.Generator().manual_seed(seed)
        dgen = torch.Generator(device=dev).manual_seed(seed) if dev.type == "cuda" else None

        def rn(*shape):
            # Random data is made on the device where possible: a 128K x 576 cache is 300 MB of float32.
            if dgen is not None:
                return torch.randn(*shape, generator=dgen, device=dev, dtype=torch.float32).to(dt)
            return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dt).to(dev)

        B, L, Lq = p.batch, p.context, p.q_per_seq
        q = rn(p.T, p.H, p.Dqk)
        q_rope = rn(p.T, p.H, p.Dr) if p.Dr else None
        kv_log = rn(B, L, p.Hkv, p.Dqk)
        kvr_log = rn(B, L, p.Hkv, p.Dr) if p.Dr else None
        v_log = None if p.latent else rn(B, L, p.Hkv, p.Dv)
        indices = sample_indices(p, dev, gen)

        kwargs: Dict[str, object] = dict(q=q, indices=indices, block_size=p.block_size, causal=p.causal)
        if p.sink:  # drawn last: the other inputs do not depend on it
            kwargs["attn_sink"] = torch.randn(p.H, generator=gen).to(dev)
        if p.latent:
            kwargs["d_v"] = p.Dv
        if q_rope is not None:
            kwargs["q_rope"] = q_rope
        if B > 1:
            kwargs["cu_seqlens_q"] = (torch.arange(B + 1, dtype=torch.int32) * Lq).to(dev)
        if p.page_size:
            pg = p.page_size
            npg = math.ceil(L / pg)
            P = B * npg
            # Pages scattered over the pool in a random order, as a serving cache ends up.
            perm = torch.randperm(P, generator=gen).to(dev)
            table = perm.view(B, npg).to(torch.int32)

            def paged(x):
                if x is None:
                    return None
                D = x.shape[-1]
                pad = npg * pg - L
                xp = torch.cat([x, x.new_zeros(B, pad, p.Hkv, D)], dim=1) if pad else x
                pool = torch.empty(P, pg, p.Hkv, D, dtype=x.dtype, device=dev)
                pool[perm.to(torch.int64)] = xp.reshape(P, pg, p.Hkv, D)
                return pool

            kwargs.update(kv=paged(kv_log), block_table=table,
                          seqlens_k=torch.full((B,), L, dtype=torch.int32, device=dev))
            stores = dict(kv_rope=paged(kvr_log), v=paged(v_log))
        else:
            flat = lambda x: None if x is None else x.reshape(B * L, p.Hkv, x.shape[-1])  # noqa: E731
            kwargs["kv"] = flat(kv_log)
            stores = dict(kv_rope=flat(kvr_log), v=flat(v_log))
            if B > 1:
                kwargs["cu_seqlens_k"] = (torch.arange(B + 1, dtype=torch.int32) * L).to(dev)
        kwargs.update({k: x for k, x in stores.items() if x is not None})
        if p.kv_quant:
            # Quantized per row, so quantizing the (paged) storage and the logical view gives the same
            # values; the logical views become those values, dequantized.
            from .api import quantize_kv

            qdt, sb = QUANT_DTYPES_BY_NAME[p.kv_quant], p.scale_block
            for name, scale_name in (("kv", "kv_scale"), ("v", "v_scale")):
                if name in kwargs:
                    kwargs[name], kwargs[scale_name] = quantize_kv(kwargs[name], qdt, sb)
            if sb != 128:  # the op's default
                kwargs["scale_block"] = sb
            kv_log = python_ref.dequantize(*quantize_kv(kv_log, qdt, sb), sb)
            v_log = None if v_log is None else python_ref.dequantize(*quantize_kv(v_log, qdt, sb), sb)
        return kwargs, kv_log, kvr_log, v_log

def _cu(lengths: Sequence[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


# The matrix. Names are test ids; keep shapes small enough for the Triton interpreter.
_BASE = Case("base")
CASES: List[Case] = [
    replace(_BASE, name="mqa_latent"),
    replace(_BASE, name="mqa_latent_full_row", Dv=None),
    replace(_BASE, name="mha_separate_v", H=2, Hkv=2, latent=False, Dv=24),
    replace(_BASE, name="gqa_separate_v", H=8, Hkv=2, latent=False, Dv=16),
    replace(_BASE, name="gqa_latent", H=8, Hkv=2),
    replace(_BASE, name="gqa_shared_indices", H=8, Hkv=2, shared_indices=True),
    replace(_BASE, name="gqa_separate_v_shared_indices", H=6, Hkv=3, latent=False, Dv=8, shared_indices=True),
    replace(_BASE, name="mha_many_heads", H=16, Hkv=16, K=6, latent=False, Dv=16),
    replace(_BASE, name="rope_latent", Dr=8),
    replace(_BASE, name="rope_separate_v", H=4, Hkv=2, Dr=16, latent=False, Dv=32),
    replace(_BASE, name="causal", causal=True, seqs=((6, 20),)),
    replace(_BASE, name="causal_queries_exceed_keys", causal=True, seqs=((6, 4),), K=5),
    replace(_BASE, name="block2", block_size=2, K=8),
    replace(_BASE, name="block4_causal", block_size=4, K=6, causal=True, seqs=((5, 37),)),
    replace(_BASE, name="block_causal_varlen", block_size=4, K=5, causal=True,
            seqs=((3, 17), (1, 9), (4, 30)), H=4, Hkv=2),
    replace(_BASE, name="varlen", seqs=((2, 11), (3, 25), (1, 7))),
    replace(_BASE, name="varlen_causal_gqa", seqs=((2, 11), (3, 25), (2, 2)), causal=True, H=4, Hkv=2),
    replace(_BASE, name="varlen_empty_sequence", seqs=((2, 11), (0, 5), (2, 9))),
    replace(_BASE, name="paged", page_size=8),
    replace(_BASE, name="paged_varlen", page_size=4, seqs=((2, 10), (1, 3), (3, 16))),
    replace(_BASE, name="paged_latent_rope_sink_causal", page_size=8, Dr=8, sink=True, causal=True,
            seqs=((2, 19), (3, 33)), H=8),
    replace(_BASE, name="paged_block_spans_pages", page_size=6, block_size=4, K=5, seqs=((3, 22),)),
    replace(_BASE, name="paged_separate_v_gqa", page_size=4, latent=False, Dv=8, H=4, Hkv=2),
    replace(_BASE, name="sink", sink=True),
    replace(_BASE, name="sink_all_dropped", sink=True, index_mode="none_valid"),
    replace(_BASE, name="all_dropped", index_mode="none_valid"),
    replace(_BASE, name="duplicates", index_mode="dup"),
    replace(_BASE, name="valid_only", index_mode="valid"),
    replace(_BASE, name="k_zero", K=0),
    replace(_BASE, name="k_one", K=1),
    replace(_BASE, name="k_large_odd", K=77, seqs=((2, 50),)),
    replace(_BASE, name="odd_widths", Dqk=24, Dv=20, latent=False, Dr=12, H=3, Hkv=1),
    replace(_BASE, name="deepseek_widths", Dqk=576, Dv=512, H=4, K=16, seqs=((2, 40),)),
    replace(_BASE, name="deepseek_split_rope", Dqk=512, Dv=512, Dr=64, H=4, K=16, seqs=((2, 40),)),
    replace(_BASE, name="negative_scale", sm_scale=-0.3),
    replace(_BASE, name="int64_indices", index_dtype=torch.int64),
    replace(_BASE, name="strided_inputs", strided=True, Dr=8, H=4, Hkv=2, latent=False, Dv=16),
    replace(_BASE, name="single_token", seqs=((1, 40),), varlen_api=True),
    replace(_BASE, name="empty_cache", seqs=((2, 0),)),
    # NaN / inf garbage kept by some tokens only (docs/contract.md: NaN propagates where it is kept)
    # A NaN/inf row kept by some tokens only: theirs is NaN (as in float64), every other token (the
    # other sequence, same-sequence tokens that did not select it or dropped it by causality) is exact.
    replace(_BASE, name="poison_nan_other_sequence", seqs=((4, 16), (4, 16)), K=16, index_mode="valid",
            poison=((0, 5, float("nan")),)),
    replace(_BASE, name="poison_inf_paged_gqa", page_size=4, seqs=((4, 16), (4, 12)), H=4, Hkv=2, latent=False,
            K=12, index_mode="valid", poison=((1, 3, float("inf")),)),
    replace(_BASE, name="poison_nan_causal", seqs=((6, 20),), causal=True, K=20, index_mode="valid",
            poison=((0, 17, float("nan")),)),
    replace(_BASE, name="poison_nan_rope_sink_few_candidates", seqs=((6, 3),), K=2, Dr=8, sink=True,
            index_mode="valid", poison=((0, 1, float("nan")),)),
    replace(_BASE, name="indices_k_outer", H=8, Hkv=2, indices_k_outer=True),
    replace(_BASE, name="paged_table_without_columns", page_size=4, seqs=((2, 0), (1, 0)), table_pad=0, Dr=8),
    # Quantized caches (kv_fp8 / kv_int8); scale_block below Dqk so rows hold several tiles,
    # and one not dividing it (a shorter last tile). NaN garbage rows carry NaN scales.
    replace(_BASE, name="fp8_paged_latent_rope_sink_causal", page_size=8, Dr=8, sink=True, causal=True,
            seqs=((2, 19), (3, 33)), H=8, kv_quant="fp8", scale_block=16),
    replace(_BASE, name="int8_paged_latent_rope_sink_causal", page_size=8, Dr=8, sink=True, causal=True,
            seqs=((2, 19), (3, 33)), H=8, kv_quant="int8", scale_block=16),
    replace(_BASE, name="fp8_varlen", seqs=((2, 11), (3, 25), (1, 7)), kv_quant="fp8", scale_block=12),
    replace(_BASE, name="int8_block_causal_varlen", block_size=4, K=5, causal=True,
            seqs=((3, 17), (1, 9), (4, 30)), H=4, Hkv=2, kv_quant="int8", scale_block=8),
    replace(_BASE, name="fp8_gqa_separate_v", H=8, Hkv=2, latent=False, Dv=16, kv_quant="fp8", scale_block=8),
    replace(_BASE, name="int8_gqa_separate_v_paged", page_size=4, latent=False, Dv=24, H=4, Hkv=2,
            kv_quant="int8", scale_block=16),
    replace(_BASE, name="int8_strided_rope_separate_v", strided=True, Dr=8, H=4, Hkv=2, latent=False, Dv=16,
            kv_quant="int8", scale_block=16),
    replace(_BASE, name="fp8_deepseek_split_rope", Dqk=512, Dv=512, Dr=64, H=4, K=16, seqs=((2, 40),),
            kv_quant="fp8"),
    replace(_BASE, name="int8_deepseek_split_rope", Dqk=512, Dv=512, Dr=64, H=4, K=16, seqs=((2, 40),),
            kv_quant="int8"),
    replace(_BASE, name="fp8_poison_nan_other_sequence", seqs=((4, 16), (4, 16)), K=16, index_mode="valid",
            poison=((0, 5, float("nan")),), kv_quant="fp8", scale_block=8),
]
CASES_BY_NAME: Dict[str, Case] = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"


# ---------------------------------------------------------------------------------------------
# Workloads: the one description of a *uniform* problem (``batch`` sequences, each ``q_per_seq``
# query tokens at the end of ``context`` kv positions) used by ``attention.tune`` presets and the
# ``bench`` presets. The matrix above (:class:`Case`) describes irregular, adversarial points built
# with the same field names.
# ---------------------------------------------------------------------------------------------

def Problem(family: str, batch: int = 1, q_per_seq: int = 1, context: int = 4096, *, H: int = 128, Hkv: int = 1,
            Dqk: int = 576, Dv: int = 512, Dr: int = 0, latent: bool = True, K: int = 2048, block_size: int = 1,
            page_size: int = 64, causal: bool = False, shared_indices: bool = True, dtype: str = "bfloat16",
            description: str = "", **fields) -> Case:
    """A uniform workload as a :class:`Case`: ``batch`` sequences, each ``q_per_seq`` query tokens at the
    end of ``context`` kv positions, with selector-like indices (``index_mode="selector"``). Defaults:
    DeepSeek-V3.2 sparse MLA (H=128 heads on one 576-wide latent kv head, top-2048, paged bfloat16).

    Indices are what a selector returns: per (token, index group) ``K`` *distinct* units (tokens,
    or blocks of ``block_size``) the query may see, drawn at random, -1 padded when fewer exist
    (early tokens of a causal prefill). ``fields``: other Case fields (``sink``, ``op``...).
    """
    return Case(name=f"{family}/L={context}", family=family, seqs=((q_per_seq, context),) * batch, H=H, Hkv=Hkv,
                Dqk=Dqk, Dv=Dv, Dr=Dr, latent=latent, K=K, block_size=block_size, page_size=page_size,
                causal=causal, shared_indices=shared_indices, index_mode="selector", dtype=dtype,
                description=description, **fields)


#: Problem()'s named fields (a report row's keys), and the Case fields a workload may also set
_WORKLOAD_FIELDS = ("family", "batch", "q_per_seq", "context", "H", "Hkv", "Dqk", "Dv", "Dr", "latent", "K",
                    "block_size", "page_size", "causal", "shared_indices", "dtype", "description", "kv_quant")
_WORKLOAD_EXTRAS = ("sink", "op", "scale_block")
_CASE_DEFAULTS = {f.name: f.default for f in fields(Case)}


def sample_indices(p: Case, device, gen: torch.Generator) -> torch.Tensor:
    """[T, G, K] int32: distinct units each query may see, random order, -1 padded."""
    L, bs, Lq = p.context, p.block_size, p.q_per_seq
    n_units = math.ceil(L / bs)
    out = torch.empty(p.T, p.G, p.K, dtype=torch.int32)
    # One chunk of rows at a time keeps the [rows, G, n_units] random matrix small.
    rows_per_chunk = max(1, (1 << 24) // max(1, p.G * n_units))
    q_pos_all = L - Lq + (torch.arange(p.T) % Lq)
    for r0 in range(0, p.T, rows_per_chunk):
        r1 = min(p.T, r0 + rows_per_chunk)
        score = torch.rand(r1 - r0, p.G, n_units, generator=gen)
        if p.causal:
            # a unit is visible when its first position is at or before the query
            first = torch.arange(n_units) * bs
            visible = first[None, :] <= q_pos_all[r0:r1, None]
            score = score.masked_fill(~visible[:, None, :], float("inf"))
        k = min(p.K, n_units)
        val, idx = torch.topk(score, k, dim=-1, largest=False)
        idx = torch.where(torch.isinf(val), torch.full_like(idx, -1), idx)
        if k < p.K:
            idx = torch.cat([idx, torch.full((r1 - r0, p.G, p.K - k), -1, dtype=idx.dtype)], dim=-1)
        out[r0:r1] = idx.to(torch.int32)
    return out.to(device)


def oracle(args: Dict[str, object]) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 evaluation of docs/spec.md section 1 on the CPU from the same (rounded) inputs."""
    a = dict(args)
    q, kv, idx = a.pop("q"), a.pop("kv"), a.pop("indices")
    a.pop("backend", None)
    return python_ref.selective_attention_dense(q, kv, idx, **a)


@dataclass
class CaseResult:
    backend: str
    case: str
    dtype: str
    ok: bool
    out_err: float = float("nan")
    lse_err: float = float("nan")
    deterministic: bool = True
    message: str = ""
    skipped: bool = False
    # The vendors' own rules on out (attention/vendor_rules.py), reported beside max error; they do
    # not decide ``ok`` (docs/spec.md section 4 does).
    cos_diff: float = float("nan")
    cann_percent: float = float("nan")
    cann_pass: Optional[bool] = None

    def as_dict(self):
        return dict(self.__dict__)


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| where both are finite-equal; inf where one is non-finite and the other not.

    Equal infinities and NaN where the oracle has NaN count as agreement (docs/spec.md: a kept candidate
    holding NaN/inf propagates as in float64); NaN anywhere else is an infinite error.
    """
    x = x.detach().to("cpu", torch.float64)
    if x.shape != ref.shape:
        return float("inf")
    if x.numel() == 0:
        return 0.0
    same = ((x == ref) & torch.isinf(ref)) | (torch.isnan(x) & torch.isnan(ref))
    d = (x - ref).abs()
    d = torch.where(same, torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (so NaN equals the same NaN, unlike torch.equal)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.detach().cpu().view(ints), b.detach().cpu().view(ints))


def run_case(backend: str, case: Case, dtype: torch.dtype, device="cpu", repeats: int = 2,
             expected: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> CaseResult:
    """Run ``case`` through ``backend`` twice and compare with the float64 oracle."""
    import attention  # local: keep this module importable without initialising backends

    name = DTYPE_NAMES[dtype]
    args = case.make(dtype, device)
    inp = attention.validate(**args)
    reasons = attention.get_backend(backend).not_supported_reasons(inp)
    if reasons:
        return CaseResult(backend, case.name, name, ok=True, skipped=True, message="; ".join(reasons))
    ref_out, ref_lse = expected if expected is not None else oracle(args)
    outs = []
    for _ in range(max(1, repeats)):
        outs.append(attention.selective_attention(**args, return_lse=True, backend=backend))
    out, lse = outs[0]
    tol_out, tol_lse = TOLERANCES[dtype]
    problems = []
    if out.dtype != dtype or tuple(out.shape) != tuple(ref_out.shape):
        problems.append(f"out is {tuple(out.shape)} {out.dtype}, expected {tuple(ref_out.shape)} {dtype}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(ref_lse.shape):
        problems.append(f"lse is {tuple(lse.shape)} {lse.dtype}, expected {tuple(ref_lse.shape)} float32")
    out_err = max_error(out, ref_out)
    lse_err = max_error(lse, ref_lse)
    if not out_err <= tol_out:
        problems.append(f"max |out - ref| = {out_err:.3g} > {tol_out}")
    if not lse_err <= tol_lse:
        problems.append(f"max |lse - ref| = {lse_err:.3g} > {tol_lse}")
    deterministic = all(same_bits(o, out) and same_bits(l_, lse) for o, l_ in outs[1:])
    if not deterministic:
        problems.append("two runs gave different bits")
    from .vendor_rules import cann_check_result, cosine_diff

    same_shape = tuple(out.shape) == tuple(ref_out.shape)
    cann_pass, cann_percent = cann_check_result(out, ref_out)
    return CaseResult(backend, case.name, name, ok=not problems, out_err=out_err, lse_err=lse_err,
                      deterministic=deterministic, message="; ".join(problems),
                      cos_diff=cosine_diff(out, ref_out) if same_shape else float("nan"),
                      cann_percent=cann_percent, cann_pass=cann_pass)
