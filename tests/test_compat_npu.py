"""attention.compat.npu against (a) a float64 evaluation of torch_npu's documented semantics and (b) the
native ops on the same data, for every layout and mode the shims accept, on every CPU backend here.

The float64 oracles loop over batches on the host, reading each layout the way torch_npu's docs
describe it (op-plugin docs/context/torch_npu-npu_sparse_flash_attention.md and
torch_npu-npu_lightning_indexer.md): "BSND" per-batch lengths, "TND" prefix sums, "PA_BSND" through
block_table; sparse_mode 3 = bottom-right causal; the indexer score sum_j w_j * relu(q_j . k) with no
scale, top-k descending with ties to the lower position, -1 / -inf at the tail. Where Huawei's own CPU
golden (ops-transformer attention/sparse_flash_attention/tests/pytest/sparse_flash_attention_golden.py)
defines a rule the docs leave open (which index entries a row reads, the sink in softmax_max/sum, the
statistics of empty rows), the attention oracle follows the golden (docs/migration.md).
"""

import math
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import attention
from _helpers import skip_if_declined as _skip_if_declined
from attention.testing import max_error as _err
from attention.compat import npu
from attention.testing import TOLERANCES

BACKENDS = [b.name for b in attention.backends() if "cpu" in b.test_devices()]
DTYPES = [torch.float32, torch.bfloat16]
DT_IDS = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
HAVE_SELECTION = all(hasattr(attention, n) for n in ("select", "lightning_indexer", "topk_indices"))
NEEDS_SELECTION = pytest.mark.skipif(
    not HAVE_SELECTION, reason="attention.select / lightning_indexer / topk_indices (docs/spec.md section 2) are not "
                               "in this build yet: npu_lightning_indexer is implemented on them")


def _check(got, ref, tol, what):
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    e = _err(got, ref)
    assert e <= tol, f"{what}: max error {e:.3g} > {tol}"


# ---------------------------------------------------------------------------------------------
# Cases: each builds torch_npu-style inputs plus, per batch, the host-side facts the oracle reads
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SfaCase:
    name: str
    layout_query: str = "BSND"
    layout_kv: str = "BSND"
    q_lens: Tuple[int, ...] = (3, 2)  # actual query tokens per batch
    kv_lens: Tuple[int, ...] = (20, 11)
    S1: int = 4  # BSND query rows per batch (>= q_lens)
    S2: int = 24  # BSND key rows per batch (>= kv_lens)
    pass_q_lens: bool = True  # BSND only: give actual_seq_lengths_query
    pass_kv_lens: bool = True  # BSND only
    N1: int = 4
    N2: int = 1
    D: int = 32
    Dr: int = 8
    Dv: Optional[int] = None  # None: value is key (MLA-absorb); else a separate value of this width
    sbs: int = 1
    K: int = 8
    page: int = 8
    sparse_mode: int = 3
    sink: bool = False
    unordered: bool = False  # invalid entries anywhere in the row, some past the end: the golden stops at the first -1


SFA_CASES = [
    SfaCase("bsnd_bsnd_causal_padded_rows"),
    SfaCase("bsnd_bsnd_full_no_lengths", q_lens=(4, 4), kv_lens=(24, 24), pass_q_lens=False, pass_kv_lens=False,
            sparse_mode=0),
    SfaCase("bsnd_bsnd_block2", sbs=2, K=6, sparse_mode=0, Dr=0),
    SfaCase("tnd_tnd_causal", layout_query="TND", layout_kv="TND", q_lens=(3, 1, 2), kv_lens=(9, 14, 5)),
    SfaCase("tnd_tnd_full_sink", layout_query="TND", layout_kv="TND", q_lens=(2, 3), kv_lens=(12, 7),
            sparse_mode=0, sink=True),
    SfaCase("bsnd_pa_causal", layout_kv="PA_BSND", q_lens=(2, 4), kv_lens=(17, 30), page=8),
    SfaCase("tnd_pa_causal_rope_sink", layout_query="TND", layout_kv="PA_BSND", q_lens=(1, 3, 2),
            kv_lens=(9, 21, 2), page=4, sink=True),
    SfaCase("tnd_pa_block4_causal", layout_query="TND", layout_kv="PA_BSND", q_lens=(2, 2), kv_lens=(19, 13),
            page=8, sbs=4, K=5),
    SfaCase("tnd_tnd_gqa_two_kv_heads", layout_query="TND", layout_kv="TND", q_lens=(2, 2), kv_lens=(10, 6),
            N1=4, N2=2),
    SfaCase("bsnd_bsnd_gqa_two_kv_heads", N1=6, N2=2, sparse_mode=0),
    SfaCase("bsnd_bsnd_separate_value", Dv=16, N1=2),
    SfaCase("tnd_bsnd_mixed_layouts", layout_query="TND", layout_kv="BSND", q_lens=(2, 3), kv_lens=(8, 20)),
    SfaCase("tnd_pa_unordered_invalid", layout_query="TND", layout_kv="PA_BSND", q_lens=(3, 2), kv_lens=(15, 9),
            unordered=True),
    SfaCase("deepseek_absorb_512_64", layout_query="TND", layout_kv="PA_BSND", q_lens=(1, 2), kv_lens=(40, 33),
            N1=4, D=512, Dr=64, K=16, page=16),
]


def _cum(xs):
    out, c = [], 0
    for x in xs:
        c += x
        out.append(c)
    return out


def make_sfa(case: SfaCase, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B = len(case.q_lens)
    N1, N2, D, Dr = case.N1, case.N2, case.D, case.Dr
    args = {}
    # --- query side
    if case.layout_query == "BSND":
        query = rn(B, case.S1, N1, D)
        q_rope = rn(B, case.S1, N1, Dr) if Dr else None
        q_rows = [[(b, s) for s in range(case.q_lens[b])] for b in range(B)]
        if case.pass_q_lens:
            args["actual_seq_lengths_query"] = torch.tensor(case.q_lens, dtype=torch.int32)
    else:
        T1 = sum(case.q_lens)
        query = rn(T1, N1, D)
        q_rope = rn(T1, N1, Dr) if Dr else None
        starts = [0] + _cum(case.q_lens)[:-1]
        q_rows = [[(starts[b] + s,) for s in range(case.q_lens[b])] for b in range(B)]
        args["actual_seq_lengths_query"] = torch.tensor(_cum(case.q_lens), dtype=torch.int32)
    # --- kv side: per batch the logical rows as a list of storage coordinates
    Dv = D if case.Dv is None else case.Dv
    if case.layout_kv == "BSND":
        key = rn(B, case.S2, N2, D)
        key_rope = rn(B, case.S2, N2, Dr) if Dr else None
        value = rn(B, case.S2, N2, Dv) if case.Dv else key
        kv_rows = [[(b, p) for p in range(case.kv_lens[b])] for b in range(B)]
        if case.pass_kv_lens:
            args["actual_seq_lengths_kv"] = torch.tensor(case.kv_lens, dtype=torch.int32)
        # rows past each batch's length are garbage the op must never read
        for b in range(B):
            key[b, case.kv_lens[b]:] = float("nan")
    elif case.layout_kv == "TND":
        T2 = sum(case.kv_lens) + 3  # 3 garbage rows at the end
        key = rn(T2, N2, D)
        key_rope = rn(T2, N2, Dr) if Dr else None
        value = rn(T2, N2, Dv) if case.Dv else key
        key[sum(case.kv_lens):] = float("nan")
        starts = [0] + _cum(case.kv_lens)[:-1]
        kv_rows = [[(starts[b] + p,) for p in range(case.kv_lens[b])] for b in range(B)]
        args["actual_seq_lengths_kv"] = torch.tensor(_cum(case.kv_lens), dtype=torch.int32)
    else:
        page = case.page
        need = [max(1, math.ceil(L / page)) for L in case.kv_lens]
        P = sum(need) + 2
        perm = torch.randperm(P, generator=g).tolist()
        table = torch.full((B, max(need) + 1), -1, dtype=torch.int32)
        k = 0
        for b in range(B):
            for j in range(need[b]):
                table[b, j] = perm[k]
                k += 1
        key = torch.full((P, page, N2, D), float("nan"))
        key_rope = torch.full((P, page, N2, Dr), float("nan")) if Dr else None
        kv_rows = []
        for b in range(B):
            rows = []
            for p in range(case.kv_lens[b]):
                pg, off = int(table[b, p // page]), p % page
                key[pg, off] = rn(N2, D)
                if Dr:
                    key_rope[pg, off] = rn(N2, Dr)
                rows.append((pg, off))
            kv_rows.append(rows)
        value = torch.where(torch.isnan(key[..., :1]), float("nan"), rn(P, page, N2, Dv)) if case.Dv else key
        args["block_table"] = table
        args["actual_seq_lengths_kv"] = torch.tensor(case.kv_lens, dtype=torch.int32)
    # --- indices: per row and kv head, distinct valid blocks first, -1 at the tail
    lead = query.shape[:-2]
    idx = torch.full((*lead, N2, case.K), -1, dtype=torch.int32)
    for b in range(B):
        n_units = max(1, math.ceil(case.kv_lens[b] / case.sbs))
        for r in q_rows[b]:
            for h in range(N2):
                n_valid = int(torch.randint(1, min(case.K, n_units) + 1, (1,), generator=g))
                sel = torch.randperm(n_units, generator=g)[:n_valid].to(torch.int32)
                row = torch.full((case.K,), -1, dtype=torch.int32)
                row[:n_valid] = sel
                if case.unordered:
                    row[-1] = n_units + 2  # past the end: ignored
                    row = row[torch.randperm(case.K, generator=g)]
                idx[r + (h,)] = row
    sinks = rn(N1) if case.sink else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    shared = value is key
    query, key, q_rope, key_rope = cast(query), cast(key), cast(q_rope), cast(key_rope)
    value = key if shared else cast(value)
    kw = dict(args, query_rope=q_rope, key_rope=key_rope, sparse_block_size=case.sbs,
              layout_query=case.layout_query, layout_kv=case.layout_kv, sparse_mode=case.sparse_mode,
              attention_mode=2, sinks=sinks)
    facts = dict(q_rows=q_rows, kv_rows=kv_rows)
    return (query, key, value, idx, (D + Dr) ** -0.5), kw, facts


def golden_entries(row, threshold, sbs):
    """The index entries Huawei's golden reads from one row (ops-transformer
    attention/sparse_flash_attention/tests/pytest/sparse_flash_attention_golden.py, gatherKV): at most
    ceil(threshold / sparse_block_size) of them, stopping at the first -1."""
    out = []
    for j in row[:max(0, min(len(row), math.ceil(threshold / sbs)))]:
        if j == -1:
            break
        out.append(j)
    return out


def row_threshold(case, Lk, Lq, s):
    return Lk if case.sparse_mode == 0 else Lk - Lq + s + 1


def oracle_sfa(case, pos_args, kw, facts):
    """float64: per batch, per valid query row, per query head, with the golden's rules: the entries it
    reads, the sink inside softmax_max / softmax_sum, zeros for rows it skips or that keep nothing
    without a sink. Returns (out, max, sum) in vendor layouts."""
    query, key, value, idx, scale = pos_args
    q_rope, k_rope, sinks = kw["query_rope"], kw["key_rope"], kw["sinks"]
    N1, N2 = query.shape[-2], key.shape[-2]
    hg = N1 // N2
    Dv = value.shape[-1]
    out = torch.zeros(*query.shape[:-1], Dv, dtype=torch.float64)
    mx = torch.zeros(query.shape[:-1], dtype=torch.float64)
    sm = torch.zeros(query.shape[:-1], dtype=torch.float64)
    for b, rows in enumerate(facts["q_rows"]):
        kvr = facts["kv_rows"][b]
        Lk, Lq = len(kvr), len(rows)
        K_ = torch.stack([key[c].double() for c in kvr]) if Lk else torch.zeros(0, N2, key.shape[-1])
        V_ = torch.stack([value[c].double() for c in kvr]) if Lk else torch.zeros(0, N2, Dv)
        KR = torch.stack([k_rope[c].double() for c in kvr]) if (Lk and k_rope is not None) else None
        for s, r in enumerate(rows):
            thr = row_threshold(case, Lk, Lq, s)
            if case.sparse_mode == 3 and thr <= 0:
                continue  # the golden skips the row: zero output, zero statistics
            for h in range(N1):
                gk = h // hg
                cand = []
                for j in golden_entries(idx[r + (gk,)].tolist(), thr, case.sbs):
                    if j < 0:
                        continue
                    cand += [p for p in range(j * case.sbs, j * case.sbs + case.sbs) if p < min(Lk, thr)]
                sink = sinks[h].double() if sinks is not None else None
                if not cand:
                    if sink is not None:
                        mx[r + (h,)], sm[r + (h,)] = sink, 1.0
                    continue
                ci = torch.tensor(cand)
                logit = K_[ci, gk] @ query[r + (h,)].double()
                if KR is not None:
                    logit = logit + KR[ci, gk] @ q_rope[r + (h,)].double()
                logit = logit * scale
                m = logit.max() if sink is None else torch.maximum(logit.max(), sink)
                e = torch.exp(logit - m)
                denom = e.sum() + (torch.exp(sink - m) if sink is not None else 0.0)
                out[r + (h,)] = (e[:, None] * V_[ci, gk]).sum(0) / denom
                mx[r + (h,)] = m
                sm[r + (h,)] = denom
    G = hg

    def vendor(x):
        if query.dim() == 4:
            B, S1 = query.shape[:2]
            return x.reshape(B, S1, N2, G).permute(0, 2, 1, 3)
        return x.reshape(query.shape[0], N2, G).permute(1, 0, 2)

    return out, vendor(mx), vendor(sm)


def native_sfa(case, pos_args, kw, facts, backend):
    """The same data through attention.selective_attention, laid out by hand on the host (a different
    route from the shim's device-side plan): valid query rows and each batch's keys concatenated."""
    query, key, value, idx, scale = pos_args
    rows = [r for rs in facts["q_rows"] for r in rs]
    q = torch.stack([query[r] for r in rows])
    qr = torch.stack([kw["query_rope"][r] for r in rows]) if kw["query_rope"] is not None else None
    ind = []  # the entries the golden reads, -1 after them
    for b, rs in enumerate(facts["q_rows"]):
        for s, r in enumerate(rs):
            thr = row_threshold(case, len(facts["kv_rows"][b]), len(rs), s)
            per_head = []
            for g in idx[r].tolist():
                e = golden_entries(g, thr, case.sbs)
                per_head.append(e + [-1] * (len(g) - len(e)))
            ind.append(torch.tensor(per_head, dtype=idx.dtype))
    ind = torch.stack(ind)
    kv_rows = [c for cs in facts["kv_rows"] for c in cs]
    kv = torch.stack([key[c] for c in kv_rows])
    kvr = torch.stack([kw["key_rope"][c] for c in kv_rows]) if kw["key_rope"] is not None else None
    v = None if value is key else torch.stack([value[c] for c in kv_rows])
    cu_q = torch.tensor([0] + _cum([len(r) for r in facts["q_rows"]]), dtype=torch.int32)
    cu_k = torch.tensor([0] + _cum([len(r) for r in facts["kv_rows"]]), dtype=torch.int32)
    out, lse = attention.selective_attention(
        q, kv, ind, v=v, q_rope=qr, kv_rope=kvr, sm_scale=scale, block_size=case.sbs, cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k, causal=case.sparse_mode == 3, attn_sink=kw["sinks"], return_lse=True, backend=backend)
    return rows, out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", SFA_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_flash_attention(backend, case, dtype):
    pos, kw, facts = make_sfa(case, dtype)
    out, smax, ssum = _skip_if_declined(backend, lambda: npu.npu_sparse_flash_attention(
        *pos, return_softmax_lse=True, backend=backend, **kw))
    query = pos[0]
    assert out.dtype == dtype and smax.dtype == torch.float32 and ssum.dtype == torch.float32
    r_out, r_max, r_sum = oracle_sfa(case, pos, kw, facts)
    tol_out, tol_lse = TOLERANCES[dtype]
    _check(out, r_out, tol_out, "attention_out")
    _check(smax, r_max, tol_lse, "softmax_max")
    # the sum is >= 1 wherever a row has a candidate or a sink (0 elsewhere): compare relatively
    _check(ssum / r_sum.clamp_min(1.0).float(), r_sum / r_sum.clamp_min(1.0), tol_lse, "softmax_sum")
    # padding rows (BSND past actual_seq_lengths_query) are zero, never NaN
    assert not torch.isnan(out).any()

    rows, n_out, n_lse = native_sfa(case, pos, kw, facts, backend)
    got = torch.stack([out[r] for r in rows])
    assert torch.allclose(got.float(), n_out.float(), atol=tol_out / 4, rtol=0), "shim != native op"
    lse = smax + torch.log(ssum)  # vendor layout -> [T, N1]
    if query.dim() == 4:
        lse = lse.permute(0, 2, 1, 3).reshape(*query.shape[:2], -1)
    else:
        lse = lse.permute(1, 0, 2).reshape(query.shape[0], -1)
    got_lse = torch.stack([lse[r] for r in rows])
    # max + log(sum) is the log of the whole softmax denominator: the sink's term included
    want = n_lse.double() if kw["sinks"] is None else torch.logaddexp(n_lse.double(), kw["sinks"].double())
    skipped = torch.tensor([case.sparse_mode == 3 and row_threshold(case, len(facts["kv_rows"][b]), len(rs), s) <= 0
                            for b, rs in enumerate(facts["q_rows"]) for s in range(len(rs))])
    want = torch.where(skipped[:, None], float("-inf"), want)
    assert _err(got_lse, want) <= tol_lse


def test_sparse_flash_attention_without_lse_returns_empty_tensors():
    case = SFA_CASES[0]
    pos, kw, facts = make_sfa(case, torch.float32)
    out, smax, ssum = npu.npu_sparse_flash_attention(*pos, **kw)
    assert smax.shape == (0,) and ssum.shape == (0,) and smax.dtype == torch.float32
    r_out, _, _ = oracle_sfa(case, pos, kw, facts)
    _check(out, r_out, 1e-4, "attention_out")


def test_sparse_flash_attention_separate_value_tensor_equal_to_key():
    """value given as a copy of key (not the same tensor) takes the separate-v path: same numbers."""
    pos, kw, facts = make_sfa(SFA_CASES[0], torch.float32)
    query, key, value, idx, scale = pos
    a, _, _ = npu.npu_sparse_flash_attention(query, key, value, idx, scale, **kw)
    b, _, _ = npu.npu_sparse_flash_attention(query, key, key.clone(), idx, scale, **kw)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_lengths_as_python_lists():
    """actual_seq_lengths_* given as lists of ints (host data) mean the same as int32 tensors."""
    pos, kw, _ = make_sfa(SFA_CASES[6], torch.float32)  # TND / PA_BSND
    a, _, _ = npu.npu_sparse_flash_attention(*pos, **kw)
    kl = dict(kw, actual_seq_lengths_query=kw["actual_seq_lengths_query"].tolist(),
              actual_seq_lengths_kv=kw["actual_seq_lengths_kv"].tolist())
    b, _, _ = npu.npu_sparse_flash_attention(*pos, **kl)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="actual_seq_lengths_kv"):
        npu.npu_sparse_flash_attention(*pos, **dict(kw, actual_seq_lengths_kv=[1.5, 2.0]))


def test_attention_mode_0_and_2_compute_the_same():
    """torch_npu supports only attention_mode=2 (its signature defaults to 0); both are accepted here
    and mean the same formula."""
    pos, kw, _ = make_sfa(SFA_CASES[6], torch.float32)
    a, _, _ = npu.npu_sparse_flash_attention(*pos, **dict(kw, attention_mode=2))
    b, _, _ = npu.npu_sparse_flash_attention(*pos, **dict(kw, attention_mode=0))
    assert torch.equal(a, b) and not torch.isnan(a).any()


def test_prefer_vendor_without_torch_npu_is_a_clear_error():
    pos, kw, _ = make_sfa(SFA_CASES[0], torch.float32)
    with pytest.raises(RuntimeError, match="torch_npu"):
        npu.npu_sparse_flash_attention(*pos, prefer_vendor=True, **kw)
    with pytest.raises(RuntimeError, match="torch_npu"):
        npu.npu_lightning_indexer(pos[0], pos[1], torch.ones(pos[0].shape[:-1]), prefer_vendor=True)


def test_sparse_flash_attention_errors_name_the_argument():
    pos, kw, _ = make_sfa(SFA_CASES[0], torch.float32)  # BSND / BSND
    bad = [
        (dict(layout_query="BNSD"), "layout_query"),
        (dict(layout_kv="PA_TND"), "layout_kv"),
        (dict(sparse_mode=1), "sparse_mode"),
        (dict(sparse_mode=4), "sparse_mode"),
        (dict(attention_mode=1), "attention_mode"),
        (dict(pre_tokens=128), "pre_tokens"),
        (dict(next_tokens=0), "next_tokens"),
        (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), "block_table"),
        (dict(layout_kv="PA_BSND"), "block_table"),
        (dict(layout_query="TND"), "query must be"),
        (dict(actual_seq_lengths_query=torch.tensor([1, 2, 3], dtype=torch.int32)), "actual_seq_lengths_query"),
        (dict(actual_seq_lengths_kv=torch.tensor([1.0, 2.0])), "actual_seq_lengths_kv"),
    ]
    for over, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            npu.npu_sparse_flash_attention(*pos, **dict(kw, **over))
    query, key, value, idx, scale = pos
    with pytest.raises(ValueError, match="sparse_indices"):
        npu.npu_sparse_flash_attention(query, key, value, idx[:1], scale, **kw)
    with pytest.raises(ValueError, match="value"):
        npu.npu_sparse_flash_attention(query, key, value[:, :5], idx, scale, **kw)
    with pytest.raises(ValueError, match="query_rope"):
        npu.npu_sparse_flash_attention(query, key, value, idx, scale, **dict(kw, query_rope=kw["query_rope"][:1]))
    tkw = dict(kw, layout_query="TND", layout_kv="TND")
    tkw.pop("actual_seq_lengths_query")
    with pytest.raises(ValueError, match="actual_seq_lengths_query is required"):
        npu.npu_sparse_flash_attention(query[0], key[0], key[0], idx[0], scale,
                                       **dict(tkw, query_rope=None, key_rope=None))


# ---------------------------------------------------------------------------------------------
# npu_lightning_indexer
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LiCase:
    name: str
    layout_query: str = "BSND"
    layout_key: str = "BSND"
    q_lens: Tuple[int, ...] = (3, 2)
    kv_lens: Tuple[int, ...] = (20, 11)
    S1: int = 4
    S2: int = 24
    pass_q_lens: bool = True
    N1: int = 4
    D: int = 16
    K: int = 8
    page: int = 8
    sparse_mode: int = 3


LI_CASES = [
    LiCase("bsnd_bsnd_causal_padded_rows"),
    LiCase("bsnd_bsnd_full_no_q_lengths", q_lens=(4, 4), pass_q_lens=False, sparse_mode=0),
    LiCase("tnd_tnd_causal", layout_query="TND", layout_key="TND", q_lens=(3, 1, 2), kv_lens=(9, 14, 5)),
    LiCase("tnd_tnd_full_k_exceeds_len", layout_query="TND", layout_key="TND", q_lens=(2, 2), kv_lens=(5, 12),
           sparse_mode=0, K=7),
    LiCase("bsnd_pa_causal", layout_key="PA_BSND", q_lens=(2, 4), kv_lens=(17, 30)),
    LiCase("tnd_pa_causal", layout_query="TND", layout_key="PA_BSND", q_lens=(1, 3, 2), kv_lens=(9, 21, 2), page=4),
    LiCase("tnd_pa_full", layout_query="TND", layout_key="PA_BSND", q_lens=(2, 1), kv_lens=(12, 30), page=8,
           sparse_mode=0, K=10),
]


def make_li(case: LiCase, dtype):
    sfa = SfaCase(case.name, layout_query=case.layout_query, layout_kv=case.layout_key, q_lens=case.q_lens,
                  kv_lens=case.kv_lens, S1=case.S1, S2=case.S2, pass_q_lens=case.pass_q_lens, N1=case.N1, N2=1,
                  D=case.D, Dr=0, K=1, page=case.page, sparse_mode=case.sparse_mode)
    (query, key, _, _, _), kw, facts = make_sfa(sfa, dtype)
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 1)
    weights = torch.randn(query.shape[:-1], generator=g).to(dtype)
    li_kw = dict(layout_query=case.layout_query, layout_key=case.layout_key, sparse_count=case.K,
                 sparse_mode=case.sparse_mode)
    for a, b in (("actual_seq_lengths_query", "actual_seq_lengths_query"),
                 ("actual_seq_lengths_kv", "actual_seq_lengths_key"), ("block_table", "block_table")):
        if a in kw:
            li_kw[b] = kw[a]
    return (query, key, weights), li_kw, facts


def oracle_li(case, pos, facts):
    query, key, weights = pos
    K = case.K
    idx = torch.full((*query.shape[:-2], 1, K), -1, dtype=torch.int32)
    vals = torch.full((*query.shape[:-2], 1, K), float("-inf"), dtype=torch.float64)
    for b, rows in enumerate(facts["q_rows"]):
        kvr = facts["kv_rows"][b]
        Lk, Lq = len(kvr), len(rows)
        if Lk == 0:
            continue
        Kb = torch.stack([key[c][0].double() for c in kvr])  # [Lk, D]
        for s, r in enumerate(rows):
            sc = (torch.relu(query[r].double() @ Kb.T) * weights[r].double()[:, None]).sum(0)  # [Lk]
            n = Lk if case.sparse_mode == 0 else max(0, min(Lk, Lk - Lq + s + 1))
            sc = sc[:n]
            order = sorted(range(n), key=lambda p: (-float(sc[p]), p))[:K]
            idx[r + (0,)][: len(order)] = torch.tensor(order, dtype=torch.int32)
            vals[r + (0,)][: len(order)] = sc[order]
    return idx, vals


@NEEDS_SELECTION
@pytest.mark.parametrize("return_value", [False, True], ids=["indices", "values"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", LI_CASES, ids=lambda c: c.name)
def test_lightning_indexer(case, dtype, return_value):
    pos, kw, facts = make_li(case, dtype)
    idx, vals = npu.npu_lightning_indexer(*pos, return_value=return_value, **kw)
    r_idx, r_vals = oracle_li(case, pos, facts)
    assert idx.dtype == torch.int32 and tuple(idx.shape) == tuple(r_idx.shape)
    assert torch.equal(idx, r_idx), "indices differ from the float64 evaluation of torch_npu's rule"
    if return_value:
        assert vals.dtype == dtype and vals.shape == idx.shape
        # values are rounded to the query's dtype, as torch_npu returns them
        rel = (vals.double() - r_vals).abs() / r_vals.abs().clamp_min(1.0)
        rel = torch.where(torch.isinf(r_vals) & (vals.double() == r_vals), torch.zeros_like(rel), rel)
        assert float(rel.max()) <= (1e-5 if dtype == torch.float32 else 1e-2)
    else:
        assert vals.shape == (0,)

    # the native selection API on the same data, laid out by hand on the host
    query, key, weights = pos
    rows = [r for rs in facts["q_rows"] for r in rs]
    kv_rows = [c for cs in facts["kv_rows"] for c in cs]
    n_idx = attention.select(
        torch.stack([query[r] for r in rows]), torch.stack([key[c][0] for c in kv_rows]),
        torch.stack([weights[r] for r in rows]), case.K, scale=1.0,
        cu_seqlens_q=torch.tensor([0] + _cum([len(r) for r in facts["q_rows"]]), dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0] + _cum([len(r) for r in facts["kv_rows"]]), dtype=torch.int32),
        causal=case.sparse_mode == 3)
    assert torch.equal(torch.stack([idx[r] for r in rows]), n_idx)


@NEEDS_SELECTION
def test_lightning_indexer_errors_name_the_argument():
    pos, kw, _ = make_li(LI_CASES[0], torch.float32)
    query, key, weights = pos
    for over, match in [(dict(layout_query="SBH"), "layout_query"), (dict(layout_key="BNSD"), "layout_key"),
                        (dict(sparse_mode=2), "sparse_mode"), (dict(sparse_count=0), "sparse_count"),
                        (dict(pre_tokens=5), "pre_tokens")]:
        with pytest.raises(ValueError, match=match):
            npu.npu_lightning_indexer(*pos, **dict(kw, **over))
    with pytest.raises(ValueError, match="weights"):
        npu.npu_lightning_indexer(query, key, weights[..., :2], **kw)
    with pytest.raises(ValueError, match="key must have one head"):
        npu.npu_lightning_indexer(query, torch.cat([key, key], dim=2), weights, **kw)


def test_no_host_reads_meta_tensors():
    """Every layout translation runs on meta tensors, which hold no data: a host read of a length or a
    table (a device sync on an NPU) would raise here."""
    dev, bf, i32 = "meta", torch.bfloat16, torch.int32
    e = lambda *s, dtype=bf: torch.empty(*s, device=dev, dtype=dtype)  # noqa: E731
    q, qr = e(5, 4, 32), e(5, 4, 8)
    k_pa, kr_pa = e(6, 8, 1, 32), e(6, 8, 1, 8)
    bt, lens, cum = e(2, 3, dtype=i32), e(2, dtype=i32), e(2, dtype=i32)
    idx = e(5, 1, 8, dtype=i32)
    out, mx, sm = npu.npu_sparse_flash_attention(
        q, k_pa, k_pa, idx, 0.1, block_table=bt, actual_seq_lengths_query=cum, actual_seq_lengths_kv=lens,
        query_rope=qr, key_rope=kr_pa, layout_query="TND", layout_kv="PA_BSND", return_softmax_lse=True,
        sinks=e(4, dtype=torch.float32))
    assert out.shape == (5, 4, 32) and mx.shape == sm.shape == (1, 5, 4)
    qb, kb, ib = e(2, 3, 4, 32), e(2, 10, 1, 32), e(2, 3, 1, 8, dtype=i32)
    out, mx, _ = npu.npu_sparse_flash_attention(qb, kb, kb, ib, 0.1, actual_seq_lengths_query=lens,
                                                actual_seq_lengths_kv=lens, return_softmax_lse=True)
    assert out.shape == (2, 3, 4, 32) and mx.shape == (2, 1, 3, 4)
    kt = e(12, 1, 32)
    out, _, _ = npu.npu_sparse_flash_attention(q, kt, kt, idx, 0.1, actual_seq_lengths_query=cum,
                                               actual_seq_lengths_kv=cum, layout_query="TND", layout_kv="TND",
                                               sparse_block_size=2, sparse_mode=0)
    assert out.shape == (5, 4, 32)
    if HAVE_SELECTION:
        w = e(5, 4)
        for rv in (False, True):
            ind, val = npu.npu_lightning_indexer(q, k_pa, w, actual_seq_lengths_query=cum, actual_seq_lengths_key=lens,
                                                 block_table=bt, layout_query="TND", layout_key="PA_BSND",
                                                 sparse_count=8, return_value=rv)
            assert ind.shape == (5, 1, 8) and val.shape == ((5, 1, 8) if rv else (0,))


# ---------------------------------------------------------------------------------------------
# Vendor equivalence: only on an NPU machine with torch_npu (never ran where this was written)
# ---------------------------------------------------------------------------------------------

def _npu_available():
    import importlib.util
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


ON_NPU = pytest.mark.skipif(not _npu_available(), reason="needs torch_npu and an NPU (prefer_vendor=True)")


def _to(x, dev):
    return x.to(dev) if isinstance(x, torch.Tensor) else x


@ON_NPU
def test_vendor_sparse_flash_attention_matches_ours_on_npu():
    """torch_npu's own op and ours on the same data, inside torch_npu's limits (N2=1, D=512+64,
    block_size 16, valid indices first, attention_mode=2)."""
    case = next(c for c in SFA_CASES if c.name == "deepseek_absorb_512_64")
    pos, kw, _ = make_sfa(case, torch.bfloat16)
    pos = tuple(_to(x, "npu") for x in pos)
    kw = {k: _to(v, "npu") for k, v in kw.items()}
    pos = (pos[0], pos[1], pos[1], pos[3], pos[4])  # value is key (MLA-absorb)
    theirs = npu.npu_sparse_flash_attention(*pos, prefer_vendor=True, **kw)[0]
    ours = npu.npu_sparse_flash_attention(*pos, **kw)[0]
    assert torch.allclose(theirs.float().cpu(), ours.float().cpu(), atol=TOLERANCES[torch.bfloat16][0], rtol=0)


@ON_NPU
def test_vendor_lightning_indexer_matches_ours_on_npu():
    case = LiCase("vendor_li", layout_query="TND", layout_key="PA_BSND", q_lens=(2, 3), kv_lens=(40, 70), N1=8,
                  D=128, K=16, page=16)
    pos, kw, _ = make_li(case, torch.bfloat16)
    pos = tuple(_to(x, "npu") for x in pos)
    kw = {k: _to(v, "npu") for k, v in kw.items()}
    theirs = npu.npu_lightning_indexer(*pos, prefer_vendor=True, **kw)[0].cpu()
    ours = npu.npu_lightning_indexer(*pos, **kw)[0].cpu()
    # bfloat16 inputs, float32 scores on both sides: compare the selected sets (order can differ on near-ties)
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(theirs.reshape(-1, case.K), ours.reshape(-1, case.K))]
    assert sum(same) >= 0.9 * len(same)


def test_sparse_flash_attention_gradients_match_the_native_op():
    """The layout translation is views and index tensors only: query's gradient is the op's."""
    case = next(c for c in SFA_CASES if c.name == "tnd_tnd_causal")
    pos, kw, facts = make_sfa(case, torch.float32)
    query, key, value, idx, scale = pos
    q1 = query.clone().requires_grad_()
    out, _, _ = npu.npu_sparse_flash_attention(q1, key, value, idx, scale, **kw)
    w = torch.arange(out.numel()).reshape(out.shape).cos()
    (out * w).sum().backward()
    q2 = query.clone().requires_grad_()
    rows, n_out, _ = native_sfa(case, (q2, key, value, idx, scale), kw, facts, None)
    (n_out * torch.stack([w[r] for r in rows])).sum().backward()
    assert torch.allclose(q1.grad, q2.grad, atol=1e-6, rtol=0) and q1.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Huawei's goldens, by hand, and the backend routing of the indexer
# ---------------------------------------------------------------------------------------------

def _one_row(idx_row, sinks=None, sparse_mode=0, kv_len=8):
    """TND, one batch, one query row, one head, D=4: returns (out, softmax_max, softmax_sum) flat and the
    inputs, so expected values are computable by hand."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, 4, generator=g, dtype=torch.float64).float()
    k = torch.randn(kv_len, 1, 4, generator=g, dtype=torch.float64).float()
    idx = torch.tensor([[idx_row]], dtype=torch.int32)
    out, smax, ssum = npu.npu_sparse_flash_attention(
        q, k, k, idx, 0.5, actual_seq_lengths_query=[1], actual_seq_lengths_kv=[kv_len], layout_query="TND",
        layout_kv="TND", sparse_mode=sparse_mode, return_softmax_lse=True, sinks=sinks)
    return out.reshape(-1), float(smax.reshape(-1)[0]), float(ssum.reshape(-1)[0]), q, k


def test_golden_stops_at_the_first_minus_one():
    """[2, -1, 2, 5]: the golden reads entry 0 only (valid indices are packed first), so the one
    candidate is position 2 and the output is that row exactly; reading every entry (the old shim)
    would average rows 2, 2 and 5."""
    out, smax, ssum, q, k = _one_row([2, -1, 2, 5])
    assert torch.allclose(out, k[2, 0], atol=1e-6, rtol=0)
    assert abs(smax - 0.5 * float(q[0, 0] @ k[2, 0])) < 1e-6 and abs(ssum - 1.0) < 1e-6


def test_golden_reads_at_most_ceil_threshold_over_block_entries():
    """Causal row of a 1-token query over 3 keys: threshold 3, so of [0, 1, 2, 1] only the first
    three entries are read (the duplicate 1 at position 3 is not)."""
    out, _, ssum, q, k = _one_row([0, 1, 2, 1], sparse_mode=3, kv_len=3)
    s = 0.5 * (k[:3, 0].double() @ q[0, 0].double())
    p = torch.softmax(s, 0)
    assert torch.allclose(out.double(), p @ k[:3, 0].double(), atol=1e-6, rtol=0)
    assert abs(ssum - float(torch.exp(s - s.max()).sum())) < 1e-6


@pytest.mark.parametrize("sink", [-3.0, 5.0], ids=["below", "above"])
def test_golden_sink_is_in_softmax_max_and_sum(sink):
    out, smax, ssum, q, k = _one_row([1, 4, -1, -1], sinks=torch.tensor([sink]))
    s = 0.5 * (k[[1, 4], 0].double() @ q[0, 0].double())
    m = max(float(s.max()), sink)
    denom = float(torch.exp(s - m).sum()) + math.exp(sink - m)
    assert abs(smax - m) < 1e-6 and abs(ssum - denom) < 1e-5 * denom
    want = (torch.exp(s - m)[:, None] * k[[1, 4], 0].double()).sum(0) / denom
    assert torch.allclose(out.double(), want, atol=1e-6, rtol=0)


def test_golden_empty_rows_report_zero_or_the_sink():
    out, smax, ssum, _, _ = _one_row([-1, 3, 4, 5])  # reads nothing
    assert (smax, ssum) == (0.0, 0.0) and not out.abs().any()
    out, smax, ssum, _, _ = _one_row([-1, 3, 4, 5], sinks=torch.tensor([1.5]))
    assert (smax, ssum) == (1.5, 1.0) and not out.abs().any()


@NEEDS_SELECTION
@pytest.mark.parametrize("return_value", [False, True], ids=["select", "indexer+topk"])
def test_lightning_indexer_backend_goes_only_to_the_ops_it_implements(return_value):
    """backend="triton" names the Triton selection backend, which has no top-k: with return_value=True
    the indexer runs on Triton and top-k chooses automatically (it used to raise "op topk_indices not
    implemented")."""
    triton_sel = _selection_backends().get("triton")
    if triton_sel is None or triton_sel.unavailable_reasons():
        pytest.skip("Triton selection backend: " + ("; ".join(triton_sel.unavailable_reasons()) if triton_sel
                                                    else "not in this build"))
    case = LI_CASES[2]
    pos, kw, facts = make_li(case, torch.float32)
    idx, vals = npu.npu_lightning_indexer(*pos, return_value=return_value, backend="triton", **kw)
    r_idx, _ = oracle_li(case, pos, facts)
    assert torch.equal(idx, r_idx)
    with pytest.raises(ValueError, match="backend"):
        npu.npu_lightning_indexer(*pos, return_value=return_value, backend="no-such-backend", **kw)


def _selection_backends():
    from attention.selection import selection_backends

    return {b.name: b for b in selection_backends()}


def test_selection_backend_routing_rule():
    from attention.compat._common import selection_backend_for

    if not {"triton", "cuda"} <= set(_selection_backends()):
        pytest.skip("needs the triton and cuda selection backends registered (they register even when unbuilt)")

    assert selection_backend_for(("lightning_indexer", "topk_indices"), None) == {
        "lightning_indexer": None, "topk_indices": None}
    assert selection_backend_for(("lightning_indexer", "topk_indices"), "reference") == {
        "lightning_indexer": "reference", "topk_indices": "reference"}
    assert selection_backend_for(("lightning_indexer", "topk_indices"), "triton") == {
        "lightning_indexer": "triton", "topk_indices": None}
    with pytest.raises(ValueError, match="none of the ops"):
        selection_backend_for(("select",), "cuda")  # a top-k-only backend for a select-only call
    with pytest.raises(ValueError, match="selection backend"):
        selection_backend_for(("select",), "ascendc")  # an attention backend, not a selection one
