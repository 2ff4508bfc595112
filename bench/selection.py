"""The ``selection`` preset: DeepSeek-V3.2 lightning indexer + top-k (docs/spec.md section 2).

Implementations: ``attention.select`` (fused), ``attention.lightning_indexer`` +
``attention.topk_indices``, and the dense baseline a user would write: the full score matrix with
matmuls, then ``torch.topk``. All are checked against top-k of float64 scores before they are timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .baselines import Impl
from .problems import DTYPES, Case


@dataclass
class SelectionInputs:
    """One sequence's indexer inputs for a Case of op "select" (``H``, ``Dqk``, ``K`` are ``Hi``, ``Di``,
    ``k``; bench/presets.py ``dsv32_selection``)."""

    problem: Case
    q_idx: torch.Tensor    # [T, Hi, Di]
    k_idx: torch.Tensor    # [L, Di]
    weights: torch.Tensor  # [T, Hi] float32
    pairs: int = 0         # visible (query, key) pairs


def make_selection_inputs(p: Case, device: str, seed: int = 0) -> SelectionInputs:
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[p.dtype]
    q = torch.randn(p.T, p.H, p.Dqk, generator=g).to(dt).to(device)
    k = torch.randn(p.context, p.Dqk, generator=g).to(dt).to(device)
    w = (torch.randn(p.T, p.H, generator=g) * p.H ** -0.5).to(device)
    q_pos = p.context - p.T + torch.arange(p.T)
    return SelectionInputs(p, q, k, w, pairs=int((q_pos + 1).clamp(max=p.context).sum()))


def selection_flops(inp: SelectionInputs) -> float:
    """2*Hi*Di per visible (query, key) pair for the dot products, + 2*Hi for relu-and-weight."""
    p = inp.problem
    return float(inp.pairs) * (2.0 * p.H * p.Dqk + 2.0 * p.H)


def selection_bytes(inp: SelectionInputs) -> float:
    p = inp.problem
    es = inp.q_idx.element_size()
    return float(p.context * p.Dqk * es + p.T * p.H * p.Dqk * es + p.T * p.H * 4 + p.T * p.K * 4)


def _dense_scores(q, k, w, scale, causal_offset: int, dtype) -> torch.Tensor:
    """I[t, s] = sum_j w[t, j] relu(scale q[t, j].k[s]); -inf where s is after the query."""
    T, Hi, Di = q.shape
    L = k.shape[0]
    s = torch.matmul(q.to(dtype).reshape(T * Hi, Di), k.to(dtype).T).view(T, Hi, L)
    s = torch.relu(s * scale)
    scores = torch.einsum("thl,th->tl", s, w.to(dtype))
    pos = torch.arange(L, device=q.device)
    q_pos = causal_offset + torch.arange(T, device=q.device)
    return scores.masked_fill(pos[None, :] > q_pos[:, None], float("-inf"))


def expected_selection(inp: SelectionInputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float64 scores [T, L], reference indices [T, k] with -1 padding) on the CPU."""
    p = inp.problem
    scores = _dense_scores(inp.q_idx.cpu(), inp.k_idx.cpu(), inp.weights.cpu(), p.Dqk ** -0.5,
                           p.context - p.T, torch.float64)
    return scores, _top_k(scores, p.K)


def _top_k(scores: torch.Tensor, K: int) -> torch.Tensor:
    """[T, K] positions of the K largest scores per row, -1 for a masked one (-inf) and past the row."""
    k = min(K, scores.shape[-1])
    val, idx = torch.topk(scores, k, dim=-1)
    idx = torch.where(torch.isinf(val), -1, idx)
    if k < K:
        idx = torch.cat([idx, idx.new_full((scores.shape[0], K - k), -1)], dim=-1)
    return idx


def check_selection(got: torch.Tensor, inp: SelectionInputs, expected) -> Tuple[bool, float, str]:
    """Same selected set as float64 top-k per row, up to near-ties at the k-th score.

    A position may differ from the float64 choice only when its float64 score is within a rounding
    distance of the k-th largest score (float32/bfloat16 arithmetic can reorder such near-ties).
    Returns (ok, worst score gap of a differing position relative to the k-th score, message).
    """
    scores, ref = expected
    p = inp.problem
    got = got.detach().cpu().to(torch.int64).reshape(p.T, -1)
    if got.shape != ref.shape:
        return False, float("inf"), f"indices shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    worst = 0.0
    for t in range(p.T):
        a = set(got[t][got[t] >= 0].tolist())
        b = set(ref[t][ref[t] >= 0].tolist())
        if len(a) != len(b) or (got[t] >= 0).sum() != len(a):
            return False, float("inf"), f"row {t}: {int((got[t] >= 0).sum())} valid entries ({len(a)} distinct), expected {len(b)}"
        diff = a ^ b
        if not diff:
            continue
        if any(x >= p.context for x in diff):
            return False, float("inf"), f"row {t}: position out of range"
        kth = float(scores[t, ref[t][len(b) - 1]])
        gap = max(abs(float(scores[t, x]) - kth) for x in diff) / (abs(kth) + 1e-12)
        worst = max(worst, gap)
    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}[p.dtype]
    if worst > tol:
        return False, worst, f"a selected position's score differs from the k-th by {worst:.3g} (relative) > {tol}"
    return True, worst, ""


class SelectFused(Impl):
    name = "attention.select"
    kind = "backend"

    def prepare(self, inp: SelectionInputs):
        import attention

        p = inp.problem
        return lambda: attention.select(inp.q_idx, inp.k_idx, inp.weights, p.K, causal=True)


class IndexerTopk(Impl):
    name = "attention.lightning_indexer+topk_indices"
    kind = "backend"

    def prepare(self, inp: SelectionInputs):
        import attention

        p = inp.problem
        return lambda: attention.topk_indices(attention.lightning_indexer(inp.q_idx, inp.k_idx, inp.weights,
                                                                          causal=True), p.K)


class DenseTopk(Impl):
    """Full [T, L] score matrix (matmul in float32 on the CPU, the input dtype elsewhere) + topk."""

    name = "dense-scores+torch.topk"
    kind = "baseline"

    def prepare(self, inp: SelectionInputs):
        p = inp.problem
        dev = inp.q_idx.device
        cdt = torch.float32 if dev.type == "cpu" else inp.q_idx.dtype
        return lambda: _top_k(_dense_scores(inp.q_idx, inp.k_idx, inp.weights, p.Dqk ** -0.5, p.context - p.T,
                                            cdt).float(), p.K)


def selection_impls() -> List[Impl]:
    return [SelectFused(), IndexerTopk(), DenseTopk()]
