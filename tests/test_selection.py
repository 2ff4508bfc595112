"""Selection (docs/spec.md section 2) against its float64 oracle, on every selection backend this machine
can run (reference; triton under TRITON_INTERPRET=1; the CUDA C++ top-k only on a GPU).

Exactness: on inputs without near ties the indices must equal the oracle's exactly. Random float
inputs are checked for near ties first (a guard, so a flaky seed fails loudly instead of silently);
tie order is tested on integer-valued inputs, whose float32 scores are exact, so the ties are real.
Unused pages and rows past the last sequence hold NaN and block tables are padded with -1: garbage
that must never reach a score.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import pytest
import torch

import attention
import python_ref
from attention.selection import selection_backends, validate_scores


@dataclass(frozen=True)
class SelCase:
    name: str
    seqs: Tuple[Tuple[int, int], ...] = ((4, 40),)  # (query tokens, kv length)
    Hi: int = 4
    Di: int = 16
    k: int = 8
    page_size: int = 0
    causal: bool = True
    integer: bool = False  # integer-valued inputs: exact float32 scores, many exact ties
    varlen_api: bool = False
    max_seqlen_k: Optional[int] = None
    block_size: int = 1
    block_reduce: str = "max"
    scale: Optional[float] = None
    quant: Optional[str] = None  # "fp8" | "int8": q_idx and k_idx quantized per row (DeepGEMM style)
    q_scale: bool = True  # with quant: q_idx_scale given (False: q cast directly, DeepGEMM's fp8_mqa_logits)
    window: bool = False  # per-token key windows cu_seqlen_ks / cu_seqlen_ke

    def make(self, dtype=torch.float32, device="cpu"):
        g = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        T = sum(lq for lq, _ in self.seqs)
        lens = [lk for _, lk in self.seqs]
        B = len(self.seqs)
        if self.integer:
            rnd = lambda *s: torch.randint(-2, 3, s, generator=g).float()  # noqa: E731
        else:
            rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        q = rnd(T, self.Hi, self.Di)
        w = rnd(T, self.Hi)
        a = {}
        if self.page_size:
            need = [max(1, math.ceil(lk / self.page_size)) for lk in lens]
            P = sum(need) + 2
            perm = torch.randperm(P, generator=g)
            table = torch.full((B, max(need) + 1), -1, dtype=torch.int32)
            kx = torch.full((P, self.page_size, self.Di), float("nan"))
            j = 0
            for b in range(B):
                for i in range(need[b]):
                    pg = int(perm[j]); j += 1
                    table[b, i] = pg
                    kx[pg] = rnd(self.page_size, self.Di)
                    tail = lens[b] - i * self.page_size
                    if tail < self.page_size:
                        kx[pg, max(tail, 0):] = float("nan")
            a.update(block_table=table, seqlens_k=torch.tensor(lens, dtype=torch.int32))
            if B > 1 or self.varlen_api:
                a["cu_seqlens_q"] = _cu([lq for lq, _ in self.seqs])
        else:
            with_cu = B > 1 or self.varlen_api
            kx = rnd(sum(lens) + (5 if with_cu else 0), self.Di)
            kx[sum(lens):] = float("nan")
            if with_cu:
                a["cu_seqlens_q"] = _cu([lq for lq, _ in self.seqs])
                a["cu_seqlens_k"] = _cu(lens)
        if self.window:  # token t of a sequence of length L sees [ks, ke), 0 <= ks <= ke <= L + 2
            ks, ke = [], []
            for lq, lk in self.seqs:
                for _ in range(lq):
                    lo = int(torch.randint(0, lk + 1, (1,), generator=g))
                    ks.append(lo)
                    ke.append(int(torch.randint(lo, lk + 3, (1,), generator=g)))
            a.update(cu_seqlen_ks=torch.tensor(ks, dtype=torch.int32), cu_seqlen_ke=torch.tensor(ke, dtype=torch.int64))
        if self.quant:
            qdt = QUANT[self.quant]
            if self.q_scale:
                q, a["q_idx_scale"] = quantize_rows(q, qdt)
            else:
                q = q.to(qdt)
            kx, a["k_idx_scale"] = quantize_rows(kx, qdt)  # NaN rows (unused storage) get NaN scales
            dtype = qdt
        a = {n: t.to(device) for n, t in a.items()}
        a.update(q_idx=q.to(dtype).to(device), k_idx=kx.to(dtype).to(device), weights=w.to(device),
                 causal=self.causal)
        if self.max_seqlen_k is not None:
            a["max_seqlen_k"] = self.max_seqlen_k
        if self.scale is not None:
            a["scale"] = self.scale
        return a


QUANT = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def quantize_rows(x: torch.Tensor, dtype: torch.dtype):
    """Per-row amax quantization (DeepGEMM's per-token cast): quantize_kv with one tile per row, the
    scale as DeepGEMM shapes it, x.shape[:-1]. A NaN row (unused storage) gets a NaN scale."""
    stored, scale = python_ref.quantize_kv(x, dtype, x.shape[-1])
    return stored, scale[..., 0]


def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


CASES = [
    SelCase("single_causal"),
    SelCase("single_not_causal", causal=False),
    SelCase("prefill_causal", seqs=((12, 30),), k=6),
    SelCase("decode_one_token", seqs=((1, 70),), k=16),
    SelCase("varlen_causal", seqs=((3, 11), (4, 25), (1, 7)), k=9),
    SelCase("varlen_empty_sequence", seqs=((2, 11), (0, 5), (2, 9)), k=5),
    SelCase("varlen_not_causal", seqs=((2, 13), (3, 20)), causal=False),
    SelCase("queries_exceed_keys", seqs=((6, 4),), k=5),
    SelCase("k_exceeds_valid", seqs=((3, 6), (2, 3)), k=10),
    SelCase("k_zero", k=0),
    SelCase("k_one", k=1),
    SelCase("paged", page_size=8, k=10),
    SelCase("paged_varlen", page_size=4, seqs=((2, 10), (1, 3), (3, 17)), k=7),
    SelCase("paged_one_seq_varlen_api", page_size=16, seqs=((3, 40),), varlen_api=True),
    SelCase("max_seqlen_wider", seqs=((2, 11), (2, 20)), max_seqlen_k=33),
    SelCase("negative_scale", scale=-0.5),
    SelCase("wide_heads", Hi=8, Di=64, seqs=((3, 50),), k=12),
    SelCase("ties_integer", integer=True, scale=1.0, seqs=((5, 60),), k=20),
    SelCase("ties_integer_varlen_paged", integer=True, scale=1.0, page_size=8, seqs=((3, 30), (2, 19)), k=12),
    # Scores from {-2..2}-valued inputs: hundreds of exact ties per row, k = 100 (K_PAD 128: a 7-stage
    # network) over 3 key chunks, so ties are broken inside a chunk and across chunks.
    SelCase("ties_integer_wide_k", integer=True, scale=1.0, Hi=2, Di=4, seqs=((3, 300),), k=100),
    SelCase("block2_max", block_size=2, k=6, seqs=((4, 41),)),
    SelCase("block4_mean", block_size=4, block_reduce="mean", k=5, seqs=((5, 37),)),
    SelCase("block4_max_varlen_paged", block_size=4, page_size=6, seqs=((3, 22), (2, 9)), k=4),
    SelCase("block3_mean_ties_integer", block_size=3, block_reduce="mean", integer=True, scale=1.0, k=7,
            seqs=((4, 31),)),
    SelCase("block8_k_exceeds_blocks", block_size=8, seqs=((2, 20),), k=6),
    SelCase("block64_max_nsa", block_size=64, k=3, seqs=((2, 300),)),  # NSA's block size: one block per tile
    SelCase("block128_mean_paged", block_size=128, block_reduce="mean", k=2, page_size=32, seqs=((1, 400), (1, 130))),
    # The indexer serving engines call: DeepGEMM's fp8_mqa_logits inputs, int8, vLLM's windows.
    SelCase("fp8_deepgemm_flat_windows", quant="fp8", q_scale=False, window=True, causal=False, seqs=((6, 50),),
            Di=32, k=7),
    SelCase("fp8_scaled_varlen", quant="fp8", seqs=((3, 20), (2, 33)), k=6),
    SelCase("int8_paged_varlen", quant="int8", page_size=8, seqs=((2, 19), (3, 30)), k=8),
    SelCase("int8_paged_windows_causal", quant="int8", window=True, page_size=4, seqs=((3, 17), (2, 23)), k=5),
    SelCase("window_varlen_not_causal", window=True, causal=False, seqs=((3, 15), (4, 26)), k=6),
    SelCase("window_paged_causal", window=True, page_size=8, seqs=((4, 40),), varlen_api=True, k=9),
    SelCase("fp8_window_block4_max", quant="fp8", window=True, block_size=4, seqs=((3, 45),), k=4),
    SelCase("int8_block2_mean_paged", quant="int8", block_size=2, block_reduce="mean", page_size=8,
            seqs=((2, 21), (1, 14)), k=5),
]
INDEXER_CASES = [c for c in CASES if c.block_size == 1]


def _cpu_backends(op):
    """Selection backends this machine can exercise on CPU tensors for ``op``."""
    out = []
    for b in selection_backends():
        if not b.implements(op) or b.unavailable_reasons():
            continue
        if b.runs_on("cpu") or (b.name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            out.append(b.name)
    return out


def _skip_unless_supported(backend, op, case, a):
    """Unsupported combinations skip with the backend's own reason (docs/style.md rule 5)."""
    from attention.selection import validate_selection

    inp = validate_selection(op, a["q_idx"], a["k_idx"], a["weights"], case.k, block_size=case.block_size,
                             block_reduce=case.block_reduce, **_indexer_kw(a))
    reasons = attention.get_backend(backend).not_supported_reasons(inp)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def _indexer_kw(a):
    return {n: v for n, v in a.items() if n not in ("q_idx", "k_idx", "weights")}


def _oracle_scores(a):
    return python_ref.lightning_indexer_dense(a["q_idx"], a["k_idx"], a["weights"], **_indexer_kw(a))


def _no_near_ties(s64: torch.Tensor, k: int, rel: float = 1e-5):
    """Guard: among each row's best k+1 valid scores, no two differ by less than rel (but aren't equal)."""
    for row in s64:
        v = row[row > float("-inf")].sort(descending=True).values[: k + 1]
        if v.numel() < 2:
            continue
        gap = (v[:-1] - v[1:]).abs()
        near = (gap > 0) & (gap < rel * (1 + v[:-1].abs()))
        assert not bool(near.any()), "test input has near ties: pick another case name"


def _expected_select(case: SelCase, a):
    s = _oracle_scores(a)
    if case.block_size > 1:
        s = python_ref.block_scores_dense(s, case.block_size, case.block_reduce)
    if not case.integer:
        _no_near_ties(s, case.k)
    return python_ref.topk_indices_dense(s, case.k)


@pytest.mark.parametrize("backend", _cpu_backends("lightning_indexer"))
@pytest.mark.parametrize("case", INDEXER_CASES, ids=lambda c: c.name)
def test_indexer_matches_oracle(backend, case):
    a = case.make()
    got = attention.lightning_indexer(**a, backend=backend)
    ref = _oracle_scores(a)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), "-inf pattern differs (masking)"
    fin = torch.isfinite(ref)
    assert not bool(torch.isnan(got).any())
    err = (got.double() - ref)[fin].abs().max().item() if fin.any() else 0.0
    assert err <= 1e-4 * (1 + ref[fin].abs().max().item() if fin.any() else 1), err
    if case.integer:
        assert torch.equal(got.double(), ref), "integer inputs give exact float32 scores"


@pytest.mark.parametrize("backend", _cpu_backends("topk_indices"))
@pytest.mark.parametrize("case", INDEXER_CASES, ids=lambda c: c.name)
def test_topk_of_indexer_matches_oracle(backend, case):
    a = case.make()
    scores = attention.lightning_indexer(**a)
    got = attention.topk_indices(scores, case.k, backend=backend)
    assert got.dtype == torch.int32 and tuple(got.shape) == (scores.shape[0], 1, case.k)
    assert torch.equal(got, _expected_select(case, a))


def _select_variants():
    """(backend, pair_sort) of the select tests: each backend as it runs here, plus the Triton kernel's
    Ascend variant (pair network instead of tl.sort, TritonSelection.pair_sort) forced on the CPU."""
    out = [pytest.param(b, None, id=b) for b in _cpu_backends("select")]
    if "triton" in _cpu_backends("select"):
        out.append(pytest.param("triton", True, id="triton-pair_sort"))
    return out


@pytest.fixture
def pair_sort(request, monkeypatch):
    """Forces TritonSelection.pair_sort for the test (None: the device's own choice)."""
    from attention.backends.triton.selection import LAUNCHER

    monkeypatch.setattr(LAUNCHER, "pair_sort_override", request.param)
    return request.param


@pytest.mark.parametrize("backend,pair_sort", _select_variants(), indirect=["pair_sort"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_select_matches_oracle(backend, pair_sort, case):
    a = case.make()
    _skip_unless_supported(backend, "select", case, a)
    got = attention.select(**a, k=case.k, block_size=case.block_size, block_reduce=case.block_reduce,
                           backend=backend)
    exp = _expected_select(case, a)
    assert got.dtype == torch.int32 and got.shape == exp.shape
    assert torch.equal(got, exp)
    # twice: deterministic
    again = attention.select(**a, k=case.k, block_size=case.block_size, block_reduce=case.block_reduce,
                             backend=backend)
    assert torch.equal(got, again)


@pytest.mark.parametrize("per_sequence", [False, True], ids=["per_token_gather", "per_sequence"])
@pytest.mark.parametrize("case", [c for c in CASES if c.k > 0], ids=lambda c: c.name)
def test_reference_select_streams_in_small_chunks(case, per_sequence):
    """Many key chunks and one-token query chunks: the running merge must give the same answer.
    Both varlen strategies: per-token gathers (the sync-free device path) and per sequence (CPU)."""
    a = case.make()
    got = python_ref.select(a.pop("q_idx"), a.pop("k_idx"), a.pop("weights"), case.k, block_size=case.block_size,
                            block_reduce=case.block_reduce, chunk_bytes=1, key_chunk=case.block_size * 3,
                            per_sequence=per_sequence, **a)
    assert torch.equal(got, _expected_select(case, case.make()))


@pytest.mark.parametrize("per_sequence", [False, True], ids=["per_token_gather", "per_sequence"])
@pytest.mark.parametrize("case", INDEXER_CASES, ids=lambda c: c.name)
def test_reference_indexer_both_varlen_strategies(case, per_sequence):
    a = case.make()
    got = python_ref.lightning_indexer(a.pop("q_idx"), a.pop("k_idx"), a.pop("weights"), chunk_bytes=1,
                                       per_sequence=per_sequence, **a)
    ref = _oracle_scores(case.make())
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    if fin.any():
        assert (got.double() - ref)[fin].abs().max() <= 1e-4 * (1 + ref[fin].abs().max())


@pytest.mark.skipif("triton" not in _cpu_backends("select"), reason="triton not runnable here")
@pytest.mark.parametrize("pair_sort", [None, True], ids=["tl_sort", "pair_sort"], indirect=True)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in (
    "single_causal", "decode_one_token", "varlen_causal", "paged_varlen", "ties_integer", "block2_max",
    "block4_max_varlen_paged", "k_exceeds_valid", "max_seqlen_wider", "fp8_deepgemm_flat_windows",
    "int8_paged_windows_causal", "fp8_window_block4_max", "ties_integer_wide_k")], ids=lambda c: c.name)
def test_triton_select_split_keys(case, pair_sort, monkeypatch):
    """The key-range split (decode path on a GPU) merges exactly: force 3 splits under the interpreter.
    pair_sort: the Ascend variant's splits write packed keys made from its pairs."""
    from attention.backends.triton.selection import LAUNCHER

    monkeypatch.setattr(LAUNCHER, "splits_override", 3)
    a = case.make()
    _skip_unless_supported("triton", "select", case, a)
    got = attention.select(**a, k=case.k, block_size=case.block_size, block_reduce=case.block_reduce,
                           backend="triton")
    assert torch.equal(got, _expected_select(case, a))


@pytest.mark.skipif("triton" not in _cpu_backends("select"), reason="triton not runnable here")
def test_triton_selection_split_under_a_program_limit(monkeypatch):
    """triton-ascend starts at most 65535 programs per launch (limits.MAX_PROGRAMS): with a limit of 3
    programs on the CPU, the indexer (2 key tiles per token: one token per launch) and the select (2
    key splits: one token per launch) run in several launches across sequence boundaries, exactly."""
    from attention.backends.triton import limits
    from attention.backends.triton.selection import LAUNCHER

    case = SelCase("program_limit", seqs=((2, 70), (3, 90)), k=9, page_size=8)
    a = case.make()
    monkeypatch.setitem(limits.MAX_PROGRAMS, "cpu", 3)
    monkeypatch.setattr(LAUNCHER, "splits_override", 2)
    scores = attention.lightning_indexer(**a, backend="triton")
    ref = _oracle_scores(a)
    assert torch.equal(torch.isinf(scores), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert (scores.double() - ref)[fin].abs().max() <= 1e-4 * (1 + ref[fin].abs().max())
    got = attention.select(**a, k=case.k, backend="triton")
    assert torch.equal(got, _expected_select(case, a))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", _cpu_backends("select"))
def test_low_precision_inputs(backend, dtype):
    """Integer-valued inputs are exact in float16/bfloat16: the answer must be the exact one."""
    case = SelCase("lowp", integer=True, scale=1.0, seqs=((3, 25), (2, 40)), k=9, page_size=8)
    a = case.make(dtype)
    got = attention.select(**a, k=case.k, backend=backend)
    assert torch.equal(got, _expected_select(case, a))


def test_tie_order_is_lower_position_first():
    scores = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 3.0, 0.0, -0.0, float("nan")]])
    got = attention.topk_indices(scores, 8)
    assert got.tolist() == [[[1, 2, 4, 0, 5, 6, -1, -1]]]
    assert torch.equal(got, python_ref.topk_indices_dense(scores, 8))


def test_topk_pads_and_k_zero():
    s = torch.tensor([[2.0, float("-inf"), 1.0]])
    assert attention.topk_indices(s, 5).tolist() == [[[0, 2, -1, -1, -1]]]
    assert attention.topk_indices(s, 0).shape == (1, 1, 0)
    assert attention.topk_indices(torch.zeros(0, 7), 3).shape == (0, 1, 3)


def test_block_scores_match_oracle():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 23, generator=g)
    s[:, 17:] = float("-inf")
    s[1, 4:8] = float("-inf")
    for b in (1, 2, 4, 5):
        for red in ("max", "mean"):
            got = attention.block_scores(s, b, red)
            ref = python_ref.block_scores_dense(s.double(), b, red)
            assert torch.equal(torch.isinf(got), torch.isinf(ref))
            fin = torch.isfinite(ref)
            assert (got.double()[fin] - ref[fin]).abs().max() <= 1e-6


def test_op_schema_and_opcheck():
    s = torch.randn(5, 33)
    assert torch.equal(torch.ops.attention.topk_indices(s, 7), python_ref.topk_indices_dense(s, 7))
    torch.library.opcheck(torch.ops.attention.topk_indices.default, (s, 7))


def test_select_output_feeds_selective_attention():
    """Token and block selection feed selective_attention directly and equal attention over the
    oracle's choice."""
    case = SelCase("wire", seqs=((3, 40), (2, 26)), page_size=8, k=8)
    a = case.make()
    g = torch.Generator().manual_seed(5)
    T = a["q_idx"].shape[0]
    P, page = a["k_idx"].shape[:2]
    kv = torch.randn(P, page, 1, 32, generator=g)
    q = torch.randn(T, 4, 32, generator=g)
    for bs, red in ((1, "max"), (4, "max"), (4, "mean")):
        idx = attention.select(**a, k=case.k, block_size=bs, block_reduce=red)
        exp = _expected_select(replace(case, block_size=bs, block_reduce=red), a)
        kw = dict(block_table=a["block_table"], seqlens_k=a["seqlens_k"], cu_seqlens_q=a["cu_seqlens_q"],
                  causal=True, block_size=bs)
        out = attention.selective_attention(q, kv, idx, **kw)
        ref, _ = python_ref.selective_attention_dense(q, kv, exp, **kw)
        assert (out.double() - ref).abs().max() <= 1e-4


def test_select_memory_does_not_build_score_matrix():
    """The reference select's working set is bounded by chunk_bytes, not T * W (checked by counting
    the largest tensor it allocates through a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, t.numel() * t.element_size())
            return out

    T, W, k = 64, 4096, 32
    g = torch.Generator().manual_seed(3)
    q, kx, w = torch.randn(T, 2, 8, generator=g), torch.randn(W, 8, generator=g), torch.randn(T, 2, generator=g)
    with Largest():
        python_ref.select(q, kx, w, k, chunk_bytes=64 << 10, key_chunk=512)
    assert Largest.biggest < T * W * 4 // 4, Largest.biggest  # score matrix would be T * W * 4 bytes


# ----------------------------------------------------------------------------- serving engines' indexer
# DeepGEMM's fp8_mqa_logits (fp8 q_idx / k_idx, per-row k scales, windows [ks, ke)) and vLLM's
# top_k_per_row with per-row lengths, checked with the vendors' own pass rules (reimplemented).

def _prefill_windows(seqs):
    """vLLM's chunked-prefill windows over one flat key buffer holding the sequences back to back:
    token i of sequence b (Lq queries over Lk keys starting at row s_b) sees rows [s_b, s_b + Lk - Lq + i + 1)."""
    ks, ke, start = [], [], 0
    for lq, lk in seqs:
        for i in range(lq):
            ks.append(start)
            ke.append(start + lk - lq + i + 1)
        start += lk
    return torch.tensor(ks, dtype=torch.int32), torch.tensor(ke, dtype=torch.int32), start


@pytest.mark.parametrize("backend", _cpu_backends("lightning_indexer"))
def test_fp8_indexer_passes_deepgemm_rule(backend):
    """DeepGEMM's test of fp8_mqa_logits: bfloat16 q and kv, q cast to fp8 as is, kv cast per row with a
    float32 scale; the logits must have the -inf pattern of the unquantized float reference and a cosine
    difference (its calc_diff, = FlashMLA's) below 1e-3 against it, -inf entries zeroed. We also hold
    the result to our own contract: the float64 evaluation on the dequantized inputs (SPEC tolerance)."""
    from attention.vendor_rules import cosine_diff

    g = torch.Generator().manual_seed(13)
    seqs = ((5, 40), (3, 64), (6, 30))
    ks, ke, S = _prefill_windows(seqs)
    T, Hi, Di = ks.shape[0], 8, 64
    q = torch.randn(T, Hi, Di, generator=g).bfloat16()
    kv = torch.randn(S, Di, generator=g).bfloat16()
    w = torch.randn(T, Hi, generator=g)
    q8 = q.to(torch.float8_e4m3fn)
    k8, k_scale = quantize_rows(kv.float(), torch.float8_e4m3fn)
    win = dict(cu_seqlen_ks=ks, cu_seqlen_ke=ke, causal=False, scale=1.0)  # DeepGEMM's logits carry no scale
    got = attention.lightning_indexer(q8, k8, w, k_idx_scale=k_scale, backend=backend, **win)
    ref = python_ref.lightning_indexer_dense(q, kv, w, **win)  # the unquantized inputs
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    diff = cosine_diff(got.masked_fill(torch.isinf(got), 0), ref.masked_fill(torch.isinf(ref), 0))
    assert diff < 1e-3, diff
    exact = python_ref.lightning_indexer_dense(q8, k8, w, k_idx_scale=k_scale, **win)  # dequantized, float64
    fin = torch.isfinite(exact)
    assert (got.double() - exact)[fin].abs().max() <= 1e-4 * (1 + exact[fin].abs().max())


def _vllm_decode_rows(gen, batch, next_n, W, clean):
    """vLLM's top_k_per_row_decode test data: row i of sequence b = i // next_n has length
    seq_lens[b] - next_n + i % next_n + 1; past it -inf (clean logits) or garbage (not clean)."""
    seq_lens = torch.randint(next_n, W, (batch,), generator=gen)
    rows = torch.arange(batch * next_n)
    lengths = (seq_lens[rows // next_n] - next_n + rows % next_n + 1).to(torch.int32)
    s = torch.randn(batch * next_n, W, generator=gen)
    if clean:
        s = torch.where(torch.arange(W)[None, :] < lengths[:, None].long(), s, float("-inf"))
    else:
        s[:, W // 2:] += 5.0  # garbage past the lengths outranks every valid score
    return s, lengths


@pytest.mark.parametrize("backend", _cpu_backends("topk_indices"))
@pytest.mark.parametrize("clean", [True, False], ids=["clean_logits", "garbage_tail"])
def test_topk_lengths_passes_vllm_rule(backend, clean):
    """vLLM's pass rule for top_k_per_row_decode: per row, the first min(k, length) indices hold the same
    set as torch.topk over the row's first `length` scores (or equal values where the sets differ), and
    every other slot is -1. Ours must also equal the float64 oracle exactly (order and ties included)."""
    gen = torch.Generator().manual_seed(7)
    k = 64
    for batch, next_n in ((3, 1), (2, 4)):
        s, lengths = _vllm_decode_rows(gen, batch, next_n, 300, clean)
        got = attention.topk_indices(s, k, lengths=lengths, backend=backend)[:, 0]
        assert torch.equal(got, python_ref.topk_indices_dense(s, k, lengths)[:, 0])
        for i, n in enumerate(lengths.tolist()):
            m = min(k, n)
            want = torch.topk(s[i, :n], m).indices
            mine = got[i, :m]
            if set(mine.tolist()) != set(want.tolist()):
                assert torch.allclose(s[i, mine.long()].sort().values, s[i, want].sort().values, rtol=1e-5, atol=1e-5)
            assert bool((mine >= 0).all()) and bool((mine < n).all())
            assert bool((got[i, m:] == -1).all())


def test_topk_lengths_minus_inf_inside_length_is_invalid():
    """The one deliberate difference with vLLM (docs/selection.md): a position inside the row's length
    whose score is -inf (or NaN) is not selected; vLLM's kernels may return it when the length is <= k."""
    s = torch.tensor([[1.0, float("-inf"), 2.0, float("nan"), 5.0, 7.0]])
    lengths = torch.tensor([4])
    got = attention.topk_indices(s, 4, lengths=lengths)
    assert got.tolist() == [[[2, 0, -1, -1]]]  # 4 and 5 lie past the length, 1 and 3 are invalid
    assert torch.equal(got, python_ref.topk_indices_dense(s, 4, lengths))
    assert torch.equal(attention.topk_indices(s, 4), python_ref.topk_indices_dense(s, 4))  # without: all 6


def test_topk_lengths_op_schema_and_opcheck():
    s = torch.randn(5, 40)
    lengths = torch.tensor([0, 3, 40, 17, 8], dtype=torch.int64)
    torch.library.opcheck(torch.ops.attention.topk_indices.default, (s, 6, lengths, None))
    compiled = torch.compile(lambda x, n: attention.topk_indices(x, 6, lengths=n), fullgraph=True)
    assert torch.equal(compiled(s, lengths), python_ref.topk_indices_dense(s, 6, lengths))


# ----------------------------------------------------------------------------- bad input
def _args():
    return SelCase("bad", seqs=((2, 10), (2, 12)), page_size=4).make()


BAD = [
    ("q_idx", TypeError, lambda a: a.update(q_idx=a["q_idx"].int())),
    ("q_idx", ValueError, lambda a: a.update(q_idx=a["q_idx"][:, 0])),
    ("k_idx", TypeError, lambda a: a.update(k_idx=a["k_idx"].double())),
    ("k_idx", ValueError, lambda a: a.update(k_idx=a["k_idx"][..., :3])),
    ("weights", ValueError, lambda a: a.update(weights=a["weights"][:, :2])),
    ("weights", TypeError, lambda a: a.update(weights=a["weights"].long())),
    ("block_table", ValueError, lambda a: a.pop("block_table")),
    ("seqlens_k", ValueError, lambda a: a.update(seqlens_k=torch.tensor([3, 99], dtype=torch.int32))),
    ("block_table", ValueError, lambda a: a["block_table"].__setitem__((0, 0), 1000)),
    ("cu_seqlens_q", ValueError, lambda a: a.update(cu_seqlens_q=torch.tensor([0, 3, 2], dtype=torch.int32))),
    ("cu_seqlens_k", ValueError, lambda a: a.update(cu_seqlens_k=torch.tensor([0, 1, 2], dtype=torch.int32))),
    ("scale", ValueError, lambda a: a.update(scale=float("inf"))),
    ("causal", TypeError, lambda a: a.update(causal=1)),
    ("max_seqlen_k", ValueError, lambda a: a.update(max_seqlen_k=5)),
    ("max_seqlen_k", TypeError, lambda a: a.update(max_seqlen_k=5.0)),
    ("backend", ValueError, lambda a: a.update(backend="nope")),
]


@pytest.mark.parametrize("name,exc,mutate", BAD, ids=[f"{n}-{e.__name__}-{i}" for i, (n, e, _) in enumerate(BAD)])
@pytest.mark.parametrize("fn", ["lightning_indexer", "select"])
def test_bad_input_names_the_argument(fn, name, exc, mutate):
    a = _args()
    mutate(a)
    call = getattr(attention, fn)
    with pytest.raises(exc, match=name):
        if fn == "select":
            call(**a, k=4)
        else:
            call(**a)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(k=-1), ValueError, "k"), (dict(k=2.0), TypeError, "k"), (dict(block_size=0), ValueError, "block_size"),
    (dict(block_reduce="sum"), ValueError, "block_reduce"),
])
def test_bad_select_scalars(kw, exc, name):
    a = _args()
    args = dict(k=4)
    args.update(kw)
    with pytest.raises(exc, match=name):
        attention.select(**a, **args)


def _qargs():
    return SelCase("badq", quant="int8", window=True, seqs=((2, 10), (2, 12)), page_size=4).make()


BAD_SERVING = [
    ("k_idx_scale", ValueError, lambda a: a.pop("k_idx_scale")),
    ("k_idx_scale", TypeError, lambda a: a.update(k_idx_scale=a["k_idx_scale"].double())),
    ("k_idx_scale", ValueError, lambda a: a.update(k_idx_scale=a["k_idx_scale"][:, :2])),
    ("q_idx_scale", ValueError, lambda a: a.update(q_idx_scale=a["q_idx_scale"][:, :1])),
    ("q_idx_scale", TypeError, lambda a: a.update(q_idx_scale=a["q_idx_scale"].half())),
    ("q_idx_scale", ValueError, lambda a: a.update(q_idx=a["q_idx"].float(), k_idx=a["k_idx"].float())),
    ("k_idx", TypeError, lambda a: a.update(k_idx=a["k_idx"].float())),
    ("q_idx", TypeError, lambda a: a.update(q_idx=a["q_idx"].float().to(torch.float8_e5m2),
                                            k_idx=a["k_idx"].float().to(torch.float8_e5m2))),
    ("cu_seqlen_ke", ValueError, lambda a: a.pop("cu_seqlen_ke")),
    ("cu_seqlen_ks", ValueError, lambda a: a.pop("cu_seqlen_ks")),
    ("cu_seqlen_ks", TypeError, lambda a: a.update(cu_seqlen_ks=a["cu_seqlen_ks"].float())),
    ("cu_seqlen_ks", ValueError, lambda a: a.update(cu_seqlen_ks=a["cu_seqlen_ks"][:-1])),
    ("cu_seqlen_ke", ValueError, lambda a: a.update(cu_seqlen_ke=a["cu_seqlen_ks"] - 1)),
    ("cu_seqlen_ks", ValueError, lambda a: a.update(cu_seqlen_ks=a["cu_seqlen_ks"] - 100)),
]


@pytest.mark.parametrize("name,exc,mutate", BAD_SERVING,
                         ids=[f"{n}-{e.__name__}-{i}" for i, (n, e, _) in enumerate(BAD_SERVING)])
@pytest.mark.parametrize("fn", ["lightning_indexer", "select"])
def test_bad_scales_and_windows_name_the_argument(fn, name, exc, mutate):
    a = _qargs()
    attention.select(**a, k=4)  # the unmutated arguments are valid
    mutate(a)
    with pytest.raises(exc, match=name):
        getattr(attention, fn)(**a, **(dict(k=4) if fn == "select" else {}))


def test_scales_with_a_trailing_one_and_strided_views():
    """Scales as SPEC section 5 shapes them ([..., 1]: one tile per row) and as strided views give the
    same scores as the plain [T, Hi] / [S] ones, on every backend."""
    case = SelCase("fp8_views", quant="fp8", seqs=((3, 20), (2, 33)), k=6, page_size=8)
    a = case.make()
    ref = _oracle_scores(a)
    for backend in _cpu_backends("lightning_indexer"):
        b = dict(a)
        b["q_idx_scale"] = a["q_idx_scale"][..., None]
        wide = torch.full(a["k_idx_scale"].shape + (3,), float("nan"))
        wide[..., 1] = a["k_idx_scale"]
        b["k_idx_scale"] = wide[..., 1]  # stride 3 in the last dimension, NaN around it
        got = attention.lightning_indexer(**b, backend=backend)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = torch.isfinite(ref)
        assert (got.double() - ref)[fin].abs().max() <= 1e-4 * (1 + ref[fin].abs().max())


def test_bad_lengths():
    s = torch.randn(3, 10)
    for lengths, exc in ((torch.tensor([1, 2]), ValueError), (torch.tensor([1.0, 2.0, 3.0]), TypeError),
                         (torch.tensor([1, 2, 11]), ValueError), (torch.tensor([1, -1, 3]), ValueError),
                         (torch.ones(3, 1, dtype=torch.int32), ValueError)):
        with pytest.raises(exc, match="lengths"):
            attention.topk_indices(s, 2, lengths=lengths)
    attention.topk_indices(s, 2, lengths=torch.tensor([0, 10, 4]))  # the bounds themselves are valid


def test_bad_scores():
    with pytest.raises(TypeError, match="scores"):
        attention.topk_indices(torch.zeros(3, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="scores"):
        attention.topk_indices(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="k"):
        validate_scores(torch.zeros(3, 4), -2)


# ----------------------------------------------------------------------------- on a GPU (skipped here)
_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@_gpu
@pytest.mark.parametrize("backend", ["cuda", "reference"])
@pytest.mark.parametrize("rows,W,k", [(3, 37, 5), (4, 1000, 2048), (5, 4096, 100), (2, 131072, 2048)])
def test_gpu_topk_matches_oracle(backend, rows, W, k):
    why = attention.get_backend(backend).unavailable_reasons()
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")
    g = torch.Generator().manual_seed(W + k)
    s = torch.randn(rows, W, generator=g)
    s[0, W // 3:] = float("-inf")
    if rows > 1:
        s[1] = torch.randint(-2, 3, (W,), generator=g).float()  # ties everywhere
    if rows > 2:
        s[2, ::7] = float("nan")
    got = attention.topk_indices(s.cuda(), k, backend=backend)
    assert torch.equal(got.cpu(), python_ref.topk_indices_dense(s, k))
    # the op's CUDA kernel (the CUDA C++ one when built) gives the same
    assert torch.equal(torch.ops.attention.topk_indices(s.cuda(), k).cpu(), got.cpu())
    lengths = torch.randint(0, W + 1, (rows,), generator=g, dtype=torch.int32)
    got = attention.topk_indices(s.cuda(), k, lengths=lengths.cuda(), backend=backend)
    assert torch.equal(got.cpu(), python_ref.topk_indices_dense(s, k, lengths))


@_gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_select_and_indexer_match_oracle(backend, case):
    a = case.make(device="cuda")
    _skip_unless_supported(backend, "select", case, a)
    got = attention.select(**a, k=case.k, block_size=case.block_size, block_reduce=case.block_reduce,
                           backend=backend)
    a_cpu = case.make()
    assert torch.equal(got.cpu(), _expected_select(case, a_cpu))
    if case.block_size == 1:
        sc = attention.lightning_indexer(**a, backend=backend).cpu()
        ref = _oracle_scores(a_cpu)
        assert torch.equal(torch.isinf(sc), torch.isinf(ref))
        fin = torch.isfinite(ref)
        if fin.any():
            assert (sc.double() - ref)[fin].abs().max() <= 1e-4 * (1 + ref[fin].abs().max())


def test_select_with_inputs_requiring_grad_keeps_no_graph():
    a = SelCase("grad", seqs=((3, 30),)).make()
    q = a.pop("q_idx").requires_grad_()
    got = attention.select(q, a.pop("k_idx"), a.pop("weights"), 5, **a)
    assert not got.requires_grad and got.grad_fn is None


def test_quantized_selection_on_npu():
    """On npu the int8 indexer is offered (compiled for Ascend by make triton-ascend-check), the quantized
    select is declined (its int8 score tile beside the pair network overflows the UB) and float8 is
    declined by the backend (A2/A3 have no FP8 type), each with its reason; the registry falls back."""
    from types import SimpleNamespace

    from attention.backends.triton import BACKEND, selection

    npu = SimpleNamespace(type="npu")
    inp = SimpleNamespace(op="lightning_indexer", block_size=1, k=0, device=npu, quantized=True,
                          features=frozenset({"contiguous", "int8"}))
    assert BACKEND.limit_reasons(inp) == []
    fp8 = SimpleNamespace(**{**vars(inp), "features": frozenset({"contiguous", "fp8"})})
    assert any("no FP8 type" in r for r in BACKEND.limit_reasons(fp8))
    sel = SimpleNamespace(**{**vars(inp), "op": "select", "k": 2048})
    assert any("quantized select on npu" in r and "UB" in r for r in BACKEND.limit_reasons(sel))
    assert selection.limit_reasons(SimpleNamespace(**{**vars(sel), "quantized": False})) == []
    assert selection.limit_reasons(SimpleNamespace(**{**vars(sel), "device": SimpleNamespace(type="cuda")})) == []
