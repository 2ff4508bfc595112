"""Benchmark problems: shapes, deterministic inputs, the FLOP/byte model and the float64 check.

A :class:`Problem` is one shape of ``attention.selective_attention``: ``batch`` sequences, each with
``q_per_seq`` query tokens (the last positions of the sequence, as in decode or a prefill chunk) and
``context`` kv positions. Problems of one ``family`` differ only in ``context``, so they plot as one
line against context length.

Indices are what a selector would return: per (token, index group) ``K`` *distinct* units (tokens, or
blocks of ``block_size``) drawn at random from those the query may see, padded with -1 when fewer
exist (early tokens of a causal prefill). Distinct indices make the boolean mask of the dense
baseline mean exactly the same thing as the index list.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Problem:
    family: str
    batch: int = 1
    q_per_seq: int = 1
    context: int = 4096
    H: int = 128
    Hkv: int = 1
    Dqk: int = 576
    Dv: int = 512
    Dr: int = 0
    latent: bool = True  # value = kv[..., :Dv] (MLA); else a separate v
    K: int = 2048
    block_size: int = 1
    page_size: int = 64  # 0 = contiguous cache
    causal: bool = False
    shared_indices: bool = True  # indices [T, 1, K] (DSA) or [T, Hkv, K] (NSA: per kv head)
    dtype: str = "bfloat16"

    @property
    def T(self) -> int:
        return self.batch * self.q_per_seq

    @property
    def name(self) -> str:
        return f"{self.family}/L={self.context}"

    @property
    def G(self) -> int:
        return 1 if self.shared_indices else self.Hkv

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        mode = "latent" if self.latent else "separate v"
        cache = f"paged({self.page_size})" if self.page_size else "contiguous"
        sel = f"K={self.K}" + (f" blocks of {self.block_size}" if self.block_size > 1 else "")
        rope = f"+{self.Dr}" if self.Dr else ""
        return (f"B={self.batch} x {self.q_per_seq} tok, L={self.context}, H={self.H}/Hkv={self.Hkv}, "
                f"Dqk={self.Dqk}{rope} Dv={self.Dv} {mode}, {sel}, {cache}, "
                f"{'causal, ' if self.causal else ''}{self.dtype}")

    def as_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["name"] = self.name
        d["T"] = self.T
        return d

    def with_overrides(self, **kw) -> "Problem":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# FLOP and byte model (docs/bench.md). Stated once, used for every row, baselines included, so the
# TFLOP/s of a dense baseline is the *useful* sparse work per second, not the work it actually did.
# ---------------------------------------------------------------------------------------------

def kept_candidates(p: Problem, indices: torch.Tensor) -> int:
    """Sum over (token, index group) of the selected positions actually attended (K_eff each)."""
    # Bench indices are distinct and never point past the sequence; -1 pads rows of early causal
    # tokens. A selected block may stick out past the query (causal) or the sequence end: count only
    # positions that are kept, so the model counts the work the contract asks for.
    idx = indices.to(torch.int64).cpu()
    valid = idx >= 0
    if p.block_size == 1:
        per_group = valid.sum()
    else:
        L, bs = p.context, p.block_size
        t = torch.arange(p.T)
        q_pos = (L - p.q_per_seq + (t % p.q_per_seq))[:, None, None]
        limit = torch.minimum(q_pos + 1, torch.tensor(L)) if p.causal else torch.full_like(q_pos, L)
        start = idx * bs
        n = (limit - start).clamp(min=0, max=bs)
        per_group = torch.where(valid, n, torch.zeros_like(n)).sum()
    groups = p.Hkv // p.G  # one shared index row serves every kv head
    return int(per_group) * groups


def flop_count(p: Problem, kept: int) -> float:
    """2*T*H*K_eff*(Dqk+Dr) + 2*T*H*K_eff*Dv, summed over tokens with their own K_eff.

    ``kept`` counts (token, kv head, position) triples; each serves H/Hkv query heads.
    """
    hg = p.H // p.Hkv
    return 2.0 * kept * hg * (p.Dqk + p.Dr) + 2.0 * kept * hg * p.Dv


def byte_count(p: Problem, kept: int) -> float:
    """Gathered kv rows (each read once per token and kv head) + q + out + indices."""
    es = torch.tensor([], dtype=p.torch_dtype).element_size()
    row = p.Dqk + p.Dr + (0 if p.latent else p.Dv)
    kv_bytes = kept * row * es
    q_bytes = p.T * p.H * (p.Dqk + p.Dr) * es
    out_bytes = p.T * p.H * p.Dv * es
    idx_bytes = p.T * p.G * p.K * 4
    return float(kv_bytes + q_bytes + out_bytes + idx_bytes)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """What every implementation gets: ``kwargs`` for selective_attention plus the logical views."""

    problem: Problem
    kwargs: Dict[str, object]        # q, kv, indices, ... exactly as a user passes them
    kv_log: torch.Tensor             # [B, L, Hkv, Dqk]   logical (unpaged) cache, same values
    kvr_log: Optional[torch.Tensor]  # [B, L, Hkv, Dr]
    v_log: Optional[torch.Tensor]    # [B, L, Hkv, Dv]   separate-v mode
    kept: int = 0

    @property
    def q(self) -> torch.Tensor:
        return self.kwargs["q"]

    @property
    def indices(self) -> torch.Tensor:
        return self.kwargs["indices"]


def sample_indices(p: Problem, device, gen: torch.Generator) -> torch.Tensor:
    """[T, G, K] int32: distinct units each query may see, random order, -1 padded."""
    L, bs, Lq = p.context, p.block_size, p.q_per_seq
    n_units = math.ceil(L / bs)
    out = torch.empty(p.T, p.G, p.K, dtype=torch.int32)
    # One sequence's rows at a time keeps the [rows, G, n_units] random matrix small.
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


def make_inputs(p: Problem, device: str, seed: int = 0) -> Inputs:
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
    if p.latent:
        kwargs["d_v"] = p.Dv
    if q_rope is not None:
        kwargs["q_rope"] = q_rope

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
        if kvr_log is not None:
            kwargs["kv_rope"] = paged(kvr_log)
        if v_log is not None:
            kwargs["v"] = paged(v_log)
        if B > 1:
            kwargs["cu_seqlens_q"] = (torch.arange(B + 1, dtype=torch.int32) * Lq).to(dev)
    else:
        flat = lambda x: None if x is None else x.reshape(B * L, p.Hkv, x.shape[-1])  # noqa: E731
        kwargs["kv"] = flat(kv_log)
        if kvr_log is not None:
            kwargs["kv_rope"] = flat(kvr_log)
        if v_log is not None:
            kwargs["v"] = flat(v_log)
        if B > 1:
            kwargs["cu_seqlens_q"] = (torch.arange(B + 1, dtype=torch.int32) * Lq).to(dev)
            kwargs["cu_seqlens_k"] = (torch.arange(B + 1, dtype=torch.int32) * L).to(dev)
    inp = Inputs(p, kwargs, kv_log, kvr_log, v_log)
    inp.kept = kept_candidates(p, indices)
    return inp


# ---------------------------------------------------------------------------------------------
# The correctness gate's expected values: float64 on the CPU from the logical cache
# ---------------------------------------------------------------------------------------------

def check_tokens(p: Problem, max_tokens: int = 32) -> List[int]:
    """Which query tokens the float64 check covers: all of them when few, else an even spread
    that always includes the first and last token of the call (and so of a causal prefill)."""
    if p.T <= max_tokens:
        return list(range(p.T))
    step = (p.T - 1) / (max_tokens - 1)
    return sorted({round(i * step) for i in range(max_tokens)})


def expected_float64(inp: Inputs, tokens: List[int]):
    """(out [n, H, Dv], lse [n, H]) float64 for the listed tokens, straight from SPEC.md section 1.

    Written independently of python_ref: it reads the *logical* cache (not the paged pool) and
    walks tokens and kv heads one at a time.
    """
    p = inp.problem
    idx_all = inp.indices.cpu().to(torch.int64)
    q_all = inp.q
    qr_all = inp.kwargs.get("q_rope")
    scale = (p.Dqk + p.Dr) ** -0.5
    hg = p.H // p.Hkv
    outs, lses = [], []
    for t in tokens:
        b, i = divmod(t, p.q_per_seq)
        q_pos = p.context - p.q_per_seq + i
        out_t = torch.zeros(p.H, p.Dv, dtype=torch.float64)
        lse_t = torch.full((p.H,), float("-inf"), dtype=torch.float64)
        for g in range(p.Hkv):
            sel = idx_all[t, 0 if p.shared_indices else g]
            sel = sel[sel >= 0]
            pos = (sel[:, None] * p.block_size + torch.arange(p.block_size)[None, :]).reshape(-1)
            pos = pos[pos < p.context]
            if p.causal:
                pos = pos[pos <= q_pos]
            if pos.numel() == 0:
                continue
            pos_d = pos.to(inp.kv_log.device)
            keys = inp.kv_log[b, pos_d, g].cpu().double()
            qh = q_all[t, g * hg:(g + 1) * hg].cpu().double()
            s = qh @ keys.T
            if p.Dr:
                s = s + qr_all[t, g * hg:(g + 1) * hg].cpu().double() @ inp.kvr_log[b, pos_d, g].cpu().double().T
            s = s * scale
            vals = keys[:, :p.Dv] if p.latent else inp.v_log[b, pos_d, g].cpu().double()
            lse = torch.logsumexp(s, dim=-1)
            out_t[g * hg:(g + 1) * hg] = torch.softmax(s, dim=-1) @ vals
            lse_t[g * hg:(g + 1) * hg] = lse
        outs.append(out_t)
        lses.append(lse_t)
    return torch.stack(outs), torch.stack(lses)
