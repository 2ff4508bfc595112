"""Benchmark problems: shapes, deterministic inputs, the FLOP/byte model and the float64 check.

A problem (an ``attention.testing.Case`` made by ``attention.testing.Problem``) is one shape of
``attention.selective_attention``: ``batch`` sequences, each with ``q_per_seq`` query tokens (the last positions of the sequence, as in decode or a prefill chunk) and
``context`` kv positions. Problems of one ``family`` differ only in ``context``, so they plot as one
line against context length.

Indices are what a selector would return: per (token, index group) ``K`` *distinct* units (tokens, or
blocks of ``block_size``) drawn at random from those the query may see, padded with -1 when fewer
exist (early tokens of a causal prefill). Distinct indices make the boolean mask of the dense
baseline mean exactly the same thing as the index list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

# The problem description is shared with attention.tune and the test matrix (attention.testing);
# bench keeps its preset lists (bench/presets.py) as instances of it.
from attention.testing import DTYPES_BY_NAME as DTYPES  # noqa: E402,F401  (bench's --dtype choices)
from attention.testing import Case, Problem, sample_indices  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# FLOP and byte model (docs/bench.md). Stated once, used for every row, baselines included, so the
# TFLOP/s of a dense baseline is the *useful* sparse work per second, not the work it actually did.
# ---------------------------------------------------------------------------------------------

def kept_candidates(p: Case, indices: torch.Tensor) -> int:
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


def flop_count(p: Case, kept: int) -> float:
    """2*T*H*K_eff*(Dqk+Dr) + 2*T*H*K_eff*Dv, summed over tokens with their own K_eff.

    ``kept`` counts (token, kv head, position) triples; each serves H/Hkv query heads.
    """
    return 2.0 * kept * p.heads_per_kv * (p.Dqk + p.Dr) + 2.0 * kept * p.heads_per_kv * p.Dv


def byte_count(p: Case, kept: int) -> float:
    """Gathered kv rows (each read once per token and kv head) + q + out + indices.

    A quantized cache (``kv_quant``) row: one byte per kv (and v) value plus a float32 scale per tile
    of 128 values, the rope part in the problem's dtype (FlashMLA's V3.2 record: 512 + 16 + 128 bytes).
    """
    es = torch.tensor([], dtype=p.torch_dtype).element_size()
    if p.kv_quant:
        stored = [p.Dqk] + ([] if p.latent else [p.Dv])
        row_bytes = sum(d + 4 * -(-d // 128) for d in stored) + p.Dr * es
    else:
        row_bytes = (p.Dqk + p.Dr + (0 if p.latent else p.Dv)) * es
    kv_bytes = kept * row_bytes
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

    problem: Case
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


def make_inputs(p: Case, device: str, seed: int = 0) -> Inputs:
    kwargs, kv_log, kvr_log, v_log = p.make_logical(device, seed)
    inp = Inputs(p, kwargs, kv_log, kvr_log, v_log)
    inp.kept = kept_candidates(p, kwargs["indices"])
    return inp


# ---------------------------------------------------------------------------------------------
# The correctness gate's expected values: float64 on the CPU from the logical cache
# ---------------------------------------------------------------------------------------------

def check_tokens(p: Case, max_tokens: int = 32) -> List[int]:
    """Which query tokens the float64 check covers: all of them when few, else an even spread
    that always includes the first and last token of the call (and so of a causal prefill)."""
    if p.T <= max_tokens:
        return list(range(p.T))
    step = (p.T - 1) / (max_tokens - 1)
    return sorted({round(i * step) for i in range(max_tokens)})


def expected_float64(inp: Inputs, tokens: List[int]):
    """(out [n, H, Dv], lse [n, H]) float64 for the listed tokens, straight from docs/spec.md section 1.

    Written independently of python_ref: it reads the *logical* cache (not the paged pool) and
    walks tokens and kv heads one at a time.
    """
    p = inp.problem
    idx_all = inp.indices.cpu().to(torch.int64)
    q_all = inp.q
    qr_all = inp.kwargs.get("q_rope")
    scale = (p.Dqk + p.Dr) ** -0.5
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
            heads = slice(g * p.heads_per_kv, (g + 1) * p.heads_per_kv)  # the query heads of kv head g
            s = q_all[t, heads].cpu().double() @ keys.T
            if p.Dr:
                s = s + qr_all[t, heads].cpu().double() @ inp.kvr_log[b, pos_d, g].cpu().double().T
            s = s * scale
            vals = keys[:, :p.Dv] if p.latent else inp.v_log[b, pos_d, g].cpu().double()
            lse = torch.logsumexp(s, dim=-1)
            out_t[heads] = torch.softmax(s, dim=-1) @ vals
            lse_t[heads] = lse
        outs.append(out_t)
        lses.append(lse_t)
    return torch.stack(outs), torch.stack(lses)
