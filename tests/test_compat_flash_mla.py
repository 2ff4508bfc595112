"""attention.compat.flash_mla against (a) a float64 evaluation of FlashMLA's documented semantics and
(b) the native op on the same data, on every backend that runs on the CPU here.

The float64 oracle below is written from FlashMLA's own description (README "Equivalent PyTorch
Code", flash_mla_interface.py docstrings, tests/ref.py): gather the valid indices, natural-log LSE,
max logit, sink scaling of the output only, +inf LSE / 0 output for a row with no valid index.
"""

import math
import zlib

import pytest
import torch

import attention
import python_ref
from _helpers import skip_if_declined as _skip_if_declined
from attention.testing import max_error as _err
from attention.compat import flash_mla as fm
from attention.testing import TOLERANCES

BACKENDS = [b.name for b in attention.backends() if "cpu" in b.test_devices()]
DTYPES = [torch.float32, torch.bfloat16]
DT_IDS = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _check(got, ref, dtype, what, kind="out"):
    tol = TOLERANCES[dtype][0 if kind == "out" else 1]
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    e = _err(got, ref)
    assert e <= tol, f"{what}: max error {e:.3g} > {tol}"


# ---------------------------------------------------------------------------------------------
# float64 oracle of FlashMLA's semantics
# ---------------------------------------------------------------------------------------------

def _oracle_rows(q, keys, valid, d_v, scale, sink):
    """q [T, H, D]; keys [T, G, K, D] gathered per (token, kv head); valid [T, G, K] bool.
    Returns out [T, H, d_v], max_logits [T, H], lse [T, H] (FlashMLA conventions) in float64."""
    T, H, D = q.shape
    G = keys.shape[1]
    hg = H // G
    q = q.double().reshape(T, G, hg, D)
    keys = torch.where(valid[..., None], keys.double(), torch.zeros((), dtype=torch.float64))
    P = torch.einsum("tghd,tgkd->tghk", q, keys) * scale
    P = P.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(P, dim=-1) if P.shape[-1] else torch.full(P.shape[:-1], float("-inf"), dtype=torch.float64)
    mx = P.amax(dim=-1) if P.shape[-1] else torch.full(P.shape[:-1], float("-inf"), dtype=torch.float64)
    lse_o = lse
    if sink is not None:
        lse_o = torch.logaddexp(lse, sink.double().reshape(1, G, hg))
    lse_o = lse_o.masked_fill(lse_o == float("-inf"), float("inf"))  # -> output 0
    p = torch.exp(P - lse_o[..., None])
    out = torch.einsum("tghk,tgkd->tghd", p, keys[..., :d_v])
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return out.reshape(T, H, d_v), mx.reshape(T, H), lse.reshape(T, H)


def oracle_sparse_fwd(q, kv, indices, scale, d_v, sink=None, topk_length=None):
    s_kv = kv.shape[0]
    idx = indices.long()
    valid = (idx >= 0) & (idx < s_kv)
    if topk_length is not None:
        valid &= torch.arange(idx.shape[-1])[None, None, :] < topk_length.long()[:, None, None]
    safe = torch.where(valid, idx, 0)
    G = kv.shape[1]
    keys = kv.double()[safe, torch.arange(G)[None, :, None]]  # [T, G, K, D]
    return _oracle_rows(q, keys, valid, d_v, scale, sink)


# ---------------------------------------------------------------------------------------------
# flash_mla_sparse_fwd
# ---------------------------------------------------------------------------------------------

SPARSE_CASES = {
    # name: (s_q, h_q, h_kv, d_qk, d_v, s_kv, topk, extras)
    "mqa": (5, 4, 1, 32, 16, 40, 12, {}),
    "gqa_h_kv2": (4, 6, 2, 24, 16, 30, 9, {}),
    "odd_heads_topk": (3, 3, 1, 20, 20, 17, 7, {}),
    "sink_with_inf": (4, 4, 1, 32, 16, 40, 8, {"sink": True}),
    "topk_length": (6, 4, 1, 32, 16, 40, 10, {"topk_length": True}),
    "all_invalid_rows": (4, 2, 1, 16, 8, 20, 6, {"empty_rows": True, "sink": True}),
    "indexer_topk": (4, 4, 1, 32, 16, 40, 12, {"indexer_topk": 5, "topk_length": True}),
    "deepseek_widths": (2, 4, 1, 576, 512, 64, 16, {}),
}


def _make_sparse(name, dtype):
    s_q, h_q, h_kv, d_qk, d_v, s_kv, topk, ex = SPARSE_CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(s_q, h_q, d_qk, generator=g).to(dtype)
    kv = torch.randn(s_kv, h_kv, d_qk, generator=g).to(dtype)
    # invalid entries: -1, other negatives, and >= s_kv (all must be ignored)
    idx = torch.randint(-2, s_kv + 4, (s_q, h_kv, topk), generator=g).to(torch.int32)
    if ex.get("empty_rows"):
        idx[0] = -1
        idx[2] = s_kv + 3
    sink = None
    if ex.get("sink"):
        sink = torch.randn(h_q, generator=g)
        sink[0] = float("inf")  # FlashMLA: +inf makes that head's output 0
        if h_q > 2:
            sink[1] = float("-inf")  # -inf has no effect
    tl = None
    if ex.get("topk_length"):
        tl = torch.randint(0, topk + 1, (s_q,), generator=g).to(torch.int32)
    return q, kv, idx, d_qk ** -0.5 * 1.3, d_v, sink, tl, ex.get("indexer_topk", 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", list(SPARSE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_fwd(backend, case, dtype):
    q, kv, idx, scale, d_v, sink, tl, itk = _make_sparse(case, dtype)
    res = _skip_if_declined(backend, lambda: fm.flash_mla_sparse_fwd(
        q, kv, idx, scale, d_v=d_v, attn_sink=sink, topk_length=tl, indexer_topk=itk, backend=backend))
    assert len(res) == (4 if itk else 3)
    out, mx, lse = res[:3]
    assert out.dtype == dtype and mx.dtype == torch.float32 and lse.dtype == torch.float32
    r_out, r_mx, r_lse = oracle_sparse_fwd(q, kv, idx, scale, d_v, sink, tl)
    _check(out, r_out, dtype, "out")
    _check(mx, r_mx, dtype, "max_logits", "lse")
    _check(lse, r_lse, dtype, "lse", "lse")
    if itk:
        tl_i = torch.clamp(tl if tl is not None else torch.full((q.shape[0],), itk), max=itk)
        _, _, r_lse_i = oracle_sparse_fwd(q, kv, idx[..., :itk], scale, d_v, None, tl_i)
        _check(res[3], r_lse_i, dtype, "lse_indexer", "lse")

    # Same data through the native op: identical bits (the shim only re-labels conventions).
    idx_n = idx
    if tl is not None:
        idx_n = torch.where(torch.arange(idx.shape[-1])[None, None, :] < tl[:, None, None], idx, -1)
    n_out, n_lse = attention.selective_attention(q, kv, idx_n, d_v=d_v, sm_scale=scale, attn_sink=sink,
                                                 return_lse=True, backend=backend)
    assert torch.equal(out, n_out)
    assert torch.equal(lse, n_lse.masked_fill(n_lse == float("-inf"), float("inf")))


def test_sparse_fwd_empty_row_conventions():
    """FlashMLA's documented all-invalid row: out 0, lse +inf, max_logits -inf (never NaN)."""
    q, kv, idx, scale, d_v, sink, tl, _ = _make_sparse("all_invalid_rows", torch.float32)
    out, mx, lse = fm.flash_mla_sparse_fwd(q, kv, idx, scale, d_v=d_v, attn_sink=sink)
    for row in (0, 2):
        assert torch.all(out[row] == 0)
        assert torch.all(lse[row] == float("inf"))
        assert torch.all(mx[row] == float("-inf"))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_sparse_fwd_skip_max_logits():
    q, kv, idx, scale, d_v, *_ = _make_sparse("mqa", torch.float32)
    out, mx, lse = fm.flash_mla_sparse_fwd(q, kv, idx, scale, d_v=d_v, compute_max_logits=False)
    assert mx is None
    ref_out, _, ref_lse = oracle_sparse_fwd(q, kv, idx, scale, d_v)
    _check(out, ref_out, torch.float32, "out")
    _check(lse, ref_lse, torch.float32, "lse", "lse")


# ---------------------------------------------------------------------------------------------
# flash_mla_with_kvcache: sparse decode
# ---------------------------------------------------------------------------------------------

def _make_cache(g, num_blocks, page, h_k, d, dtype):
    return torch.randn(num_blocks, page, h_k, d, generator=g).to(dtype)


def oracle_sparse_decode(q, caches, idx_list, tl_list, scale, d_v, sink):
    """q [b, s_q, h_q, d]; per cache: flat-slot indices [b, s_q, topk] (-1 / out of range invalid)."""
    b, s_q, h_q, d = q.shape
    keys_all, valid_all = [], []
    for cache, idx, tl in zip(caches, idx_list, tl_list):
        flat = cache.double().reshape(-1, cache.shape[2], d)
        i = idx.long().reshape(b * s_q, 1, -1)
        valid = (i >= 0) & (i < flat.shape[0])
        if tl is not None:
            valid &= torch.arange(i.shape[-1])[None, None, :] < tl.long().repeat_interleave(s_q)[:, None, None]
        safe = torch.where(valid, i, 0)
        G = flat.shape[1]
        keys_all.append(flat[safe.expand(-1, G, -1), torch.arange(G)[None, :, None]])
        valid_all.append(valid.expand(-1, G, -1))
    keys = torch.cat(keys_all, dim=2)
    valid = torch.cat(valid_all, dim=2)
    out, _, lse = _oracle_rows(q.reshape(b * s_q, h_q, d), keys, valid, d_v, scale, sink)
    return out.reshape(b, s_q, h_q, d_v), lse.reshape(b, s_q, h_q).transpose(1, 2)


DECODE_SPARSE = {
    # b, s_q, h_q, h_k, d, d_v, blocks, page, topk, extras
    "mqa": (2, 1, 4, 1, 32, 16, 6, 8, 10, {}),
    "mtp_s_q2_gqa": (2, 2, 4, 2, 24, 16, 5, 4, 7, {}),
    "sink_topk_length": (3, 2, 4, 1, 32, 16, 6, 8, 9, {"sink": True, "topk_length": True}),
    "extra_cache": (2, 2, 4, 1, 32, 16, 5, 8, 6, {"extra": True, "sink": True, "topk_length": True}),
    "empty_rows": (2, 1, 2, 1, 16, 8, 4, 4, 5, {"empty": True}),
}


def _make_decode_sparse(name, dtype):
    b, s_q, h_q, h_k, d, d_v, blocks, page, topk, ex = DECODE_SPARSE[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    cache = _make_cache(g, blocks, page, h_k, d, dtype)
    idx = torch.randint(-1, blocks * page + 3, (b, s_q, topk), generator=g).to(torch.int32)
    if ex.get("empty"):
        idx[0] = -1
    sink = torch.randn(h_q, generator=g) if ex.get("sink") else None
    tl = torch.randint(0, topk + 1, (b,), generator=g).to(torch.int32) if ex.get("topk_length") else None
    extra = None
    if ex.get("extra"):
        e_cache = _make_cache(g, 3, 4, h_k, d, dtype)  # another page size
        e_idx = torch.randint(-1, 12, (b, s_q, 5), generator=g).to(torch.int32)
        e_tl = torch.randint(0, 6, (b,), generator=g).to(torch.int32)
        extra = (e_cache, e_idx, e_tl)
    return q, cache, idx, d ** -0.5, d_v, sink, tl, extra


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", list(DECODE_SPARSE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_sparse(backend, case, dtype):
    q, cache, idx, scale, d_v, sink, tl, extra = _make_decode_sparse(case, dtype)
    meta, none = fm.get_mla_metadata()
    assert none is None
    kw = dict(indices=idx, attn_sink=sink, topk_length=tl)
    if extra is not None:
        kw.update(extra_k_cache=extra[0], extra_indices_in_kvcache=extra[1], extra_topk_length=extra[2])
    out, lse = _skip_if_declined(backend, lambda: fm.flash_mla_with_kvcache(
        q, cache, None, None, d_v, meta, None, backend=backend, **kw))
    b, s_q, h_q, d = q.shape
    assert out.shape == (b, s_q, h_q, d_v) and out.dtype == dtype
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    caches, idxs, tls = [cache], [idx], [tl]
    if extra is not None:
        caches.append(extra[0]), idxs.append(extra[1]), tls.append(extra[2])
    r_out, r_lse = oracle_sparse_decode(q, caches, idxs, tls, scale, d_v, sink)
    # a merge of two parts rounds each part to q's dtype once more: allow that rounding in bfloat16
    _check(out, r_out, dtype, "out")
    _check(lse, r_lse, dtype, "lse", "lse")
    # the same metadata object is reusable with the same shapes
    out2, _ = fm.flash_mla_with_kvcache(q, cache, None, None, d_v, meta, None, backend=backend, **kw)
    assert torch.equal(out, out2)
    if extra is None:
        i = idx.reshape(b * s_q, 1, -1)
        if tl is not None:
            i = torch.where(torch.arange(i.shape[-1])[None, None, :] < tl.repeat_interleave(s_q)[:, None, None], i, -1)
        n_out, n_lse = attention.selective_attention(
            q.reshape(b * s_q, h_q, d), cache.reshape(-1, cache.shape[2], d), i, d_v=d_v, sm_scale=scale,
            attn_sink=sink, return_lse=True, backend=backend)
        assert torch.equal(out.reshape(b * s_q, h_q, d_v), n_out)
        assert torch.equal(lse.transpose(1, 2).reshape(b * s_q, h_q),
                           n_lse.masked_fill(n_lse == float("-inf"), float("inf")))


# ---------------------------------------------------------------------------------------------
# flash_mla_with_kvcache: FlashMLA's FP8 cache (V3.2 layout, README "FP8 KV Cache")
# ---------------------------------------------------------------------------------------------

def quantize_fp8_v32(cache):
    """bf16 [nb, page, 1, 576] -> FlashMLA's 656-byte records: 512 float8_e4m3 (4 tiles of 128, each
    scaled by its own float32), 4 float32 scales, 64 bfloat16 rope values. Blocks are padded by one
    record in memory (a non-contiguous cache, as FlashMLA's own quantizer lays it out)."""
    nb, page = cache.shape[:2]
    x = cache[:, :, 0].float()
    nope, rope = x[..., :512].reshape(nb, page, 4, 128), cache[:, :, 0, 512:]
    amax = nope.abs().amax(-1).clamp_min(1e-4)
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / 448.0)))  # power of two, so the round trip is exact-ish
    q8 = (nope / scale[..., None]).to(torch.float8_e4m3fn).reshape(nb, page, 512)
    rec = torch.cat([q8.view(torch.uint8), scale.contiguous().view(torch.uint8).reshape(nb, page, 16),
                     rope.contiguous().view(torch.uint8).reshape(nb, page, 128)], dim=-1)
    store = torch.zeros(nb, page + 1, 656, dtype=torch.uint8)
    store[:, :page] = rec
    deq = torch.cat([(q8.float().reshape(nb, page, 4, 128) * scale[..., None]).reshape(nb, page, 512)
                     .to(torch.bfloat16), rope], dim=-1)
    return store[:, :page].view(torch.float8_e4m3fn).unsqueeze(2), deq.unsqueeze(2)


@pytest.mark.parametrize("case", ["mqa", "sink_topk_length", "extra_cache"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_sparse_fp8(backend, case):
    q, cache, idx, scale, d_v, sink, tl, extra = _make_decode_sparse(case, torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    b, s_q, h_q, _ = q.shape
    q = torch.randn(b, s_q, h_q, 576, generator=g).to(torch.bfloat16)
    cache = torch.randn(cache.shape[0], cache.shape[1], 1, 576, generator=g).to(torch.bfloat16)
    fp8, deq = quantize_fp8_v32(cache)
    assert not fp8.is_contiguous() and fp8.shape[-1] == 656
    kw = dict(indices=idx, attn_sink=sink, topk_length=tl)
    caches, idxs, tls = [deq], [idx], [tl]
    if extra is not None:
        e8, edeq = quantize_fp8_v32(torch.randn(3, 4, 1, 576, generator=g).to(torch.bfloat16))
        kw.update(extra_k_cache=e8, extra_indices_in_kvcache=extra[1], extra_topk_length=extra[2])
        caches.append(edeq), idxs.append(extra[1]), tls.append(extra[2])
    meta, _ = fm.get_mla_metadata()
    out, lse = _skip_if_declined(backend, lambda: fm.flash_mla_with_kvcache(
        q, fp8, None, None, 512, meta, None, is_fp8_kvcache=True, backend=backend, **kw))
    r_out, r_lse = oracle_sparse_decode(q, caches, idxs, tls, 576 ** -0.5, 512, sink)
    _check(out, r_out, torch.bfloat16, "out")
    _check(lse, r_lse, torch.bfloat16, "lse", "lse")
    # the same call on the dequantized bfloat16 cache gives the same numbers
    kw_bf = dict(kw)
    if extra is not None:
        kw_bf["extra_k_cache"] = edeq
    out_bf, lse_bf = fm.flash_mla_with_kvcache(q, deq, None, None, 512, None, backend=backend, **kw_bf)
    if backend == "reference":
        # power-of-two scales: the dequantized values are exact in bfloat16, and the reference computes
        # the split rope as one float32 GEMM over both parts: the same arithmetic, the same bits
        assert torch.equal(out, out_bf)
    else:
        # a kernel's native path is another configuration (split rope, scales in the loads, its own
        # roundings of P before P @ V): the two agree within the contract's bfloat16 tolerance
        assert _err(out, out_bf.double()) <= TOLERANCES[torch.bfloat16][0]
    assert _err(lse, lse_bf.double()) <= 1e-4


def test_fp8_cache_of_another_layout_is_an_error():
    q, cache, idx, scale, d_v, *_ = _make_decode_sparse("mqa", torch.bfloat16)
    bad = torch.zeros(cache.shape[0], cache.shape[1], 1, 600, dtype=torch.uint8)  # neither V3.2 nor MODEL1
    with pytest.raises(ValueError, match="656.*584"):
        fm.flash_mla_with_kvcache(q, bad, None, None, d_v, None, indices=idx, is_fp8_kvcache=True)
    model1 = torch.zeros(cache.shape[0], cache.shape[1], 1, 584, dtype=torch.uint8)
    with pytest.raises(ValueError, match="head_dim 512"):  # MODEL1 needs q's 448 + 64 columns
        fm.flash_mla_with_kvcache(q, model1, None, None, d_v, None, indices=idx, is_fp8_kvcache=True)


# ---------------------------------------------------------------------------------------------
# flash_mla_with_kvcache: dense decode through a block table
# ---------------------------------------------------------------------------------------------

def oracle_dense_decode(q, cache, block_table, seqlens, scale, d_v, causal):
    b, s_q, h_q, d = q.shape
    page, h_k = cache.shape[1], cache.shape[2]
    outs = torch.zeros(b, s_q, h_q, d_v, dtype=torch.float64)
    lses = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    hg = h_q // h_k
    for i in range(b):
        L = int(seqlens[i])
        if L == 0:
            continue
        pages = block_table[i, : math.ceil(L / page)].long()
        k = cache.double()[pages].reshape(-1, h_k, d)[:L]  # [L, h_k, d]
        k = k.repeat_interleave(hg, dim=1)  # [L, h_q, d]
        s = torch.einsum("shd,lhd->hsl", q[i].double(), k) * scale  # [h_q, s_q, L]
        if causal:
            mask = torch.ones(s_q, L, dtype=torch.bool).tril(diagonal=L - s_q)
            s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf"))[..., None])
        outs[i] = torch.einsum("hsl,lhd->shd", p, k[..., :d_v])
        lses[i] = lse.masked_fill(lse == float("-inf"), float("inf"))
    return outs, lses


DENSE = {
    # b, s_q, h_q, h_k, d, d_v, page, seqlens, causal
    "decode": (3, 1, 4, 1, 32, 16, 8, (20, 9, 1), False),
    "mtp_causal": (2, 3, 4, 1, 32, 16, 8, (20, 9), True),
    "causal_queries_exceed_cache": (2, 4, 2, 1, 16, 16, 4, (2, 7), True),
    "gqa_empty_sequence": (3, 2, 4, 2, 24, 24, 4, (10, 0, 5), False),
}


def _make_dense(name, dtype):
    b, s_q, h_q, h_k, d, d_v, page, lens, causal = DENSE[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    need = [max(1, math.ceil(L / page)) for L in lens]
    P = sum(need) + 2
    perm = torch.randperm(P, generator=g)
    bt = torch.full((b, max(need) + 1), -1, dtype=torch.int32)  # -1 padded, as serving code does
    k = 0
    for i in range(b):
        for j in range(need[i]):
            bt[i, j] = int(perm[k])
            k += 1
    cache = torch.randn(P, page, h_k, d, generator=g)
    # positions past each sequence and unused pages hold NaN: they must never be read
    used = torch.zeros(P, page, dtype=torch.bool)
    for i in range(b):
        for p in range(lens[i]):
            used[bt[i, p // page], p % page] = True
    cache[~used] = float("nan")
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    return q, cache.to(dtype), bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5, d_v, causal


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", list(DENSE))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_dense(backend, case, dtype):
    q, cache, bt, lens, scale, d_v, causal = _make_dense(case, dtype)
    meta, _ = fm.get_mla_metadata(lens, q.shape[1] * q.shape[2], cache.shape[2])  # old-style args: ignored
    out, lse = _skip_if_declined(backend, lambda: fm.flash_mla_with_kvcache(
        q, cache, bt, lens, d_v, meta, None, causal=causal, backend=backend))
    r_out, r_lse = oracle_dense_decode(q, cache, bt, lens, scale, d_v, causal)
    _check(out, r_out, dtype, "out")
    _check(lse, r_lse, dtype, "lse", "lse")
    assert not torch.isnan(out).any()
    # native op on the same data: dense = all table positions as indices
    b, s_q, h_q, d = q.shape
    K = bt.shape[1] * cache.shape[1]
    idx = torch.arange(K, dtype=torch.int32).expand(b * s_q, 1, K).contiguous()
    n_out, n_lse = attention.selective_attention(
        q.reshape(b * s_q, h_q, d), cache, idx, d_v=d_v, sm_scale=scale,
        cu_seqlens_q=torch.arange(b + 1, dtype=torch.int32) * s_q, block_table=bt, seqlens_k=lens,
        causal=causal, return_lse=True, backend=backend)
    assert torch.equal(out.reshape(b * s_q, h_q, d_v), n_out)


# ---------------------------------------------------------------------------------------------
# metadata and errors
# ---------------------------------------------------------------------------------------------

def test_metadata_reuse_with_other_shapes_is_an_error():
    q, cache, idx, scale, d_v, *_ = _make_decode_sparse("mqa", torch.float32)
    meta, _ = fm.get_mla_metadata()
    fm.flash_mla_with_kvcache(q, cache, None, None, d_v, meta, indices=idx)
    assert meta.have_initialized and meta.config.topk == idx.shape[-1]
    with pytest.raises(ValueError, match="topk"):
        fm.flash_mla_with_kvcache(q, cache, None, None, d_v, meta, indices=idx[..., :3].contiguous())
    with pytest.raises(ValueError, match="s_q"):
        fm.flash_mla_with_kvcache(torch.cat([q, q], 1), cache, None, None, d_v, meta,
                                  indices=torch.cat([idx, idx], 1))


def test_errors_name_the_argument():
    q, cache, idx, scale, d_v, *_ = _make_decode_sparse("mqa", torch.float32)
    with pytest.raises(ValueError, match="causal"):
        fm.flash_mla_with_kvcache(q, cache, None, None, d_v, None, indices=idx, causal=True)
    with pytest.raises(ValueError, match="is_fp8_kvcache"):  # a bfloat16 cache is not the FP8 layout
        fm.flash_mla_with_kvcache(q, cache, None, None, d_v, None, indices=idx, is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="is_fp8_kvcache"):
        fm.flash_mla_with_kvcache(q, cache, torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                                  d_v, None, is_fp8_kvcache=True)
    with pytest.raises(ValueError, match="block_table and cache_seqlens"):
        fm.flash_mla_with_kvcache(q, cache, None, None, d_v, None)
    bt = torch.zeros(q.shape[0], 2, dtype=torch.int32)
    sl = torch.ones(q.shape[0], dtype=torch.int32)
    with pytest.raises(ValueError, match="topk_length"):
        fm.flash_mla_with_kvcache(q, cache, bt, sl, d_v, None, topk_length=sl)
    with pytest.raises(ValueError, match="extra_k_cache"):
        fm.flash_mla_with_kvcache(q, cache, None, None, d_v, None, indices=idx, extra_k_cache=cache)
    with pytest.raises(ValueError, match="q must be"):
        fm.flash_mla_with_kvcache(q[0], cache, None, None, d_v, None, indices=idx)
    with pytest.raises(ValueError, match="indices must have shape"):
        fm.flash_mla_with_kvcache(q, cache, None, None, d_v, None, indices=idx[:1])
    qs, kv, sidx, sc, dv, *_ = _make_sparse("mqa", torch.float32)
    with pytest.raises(ValueError, match="kv must be"):
        fm.flash_mla_sparse_fwd(qs, kv[:, 0], sidx, sc, d_v=dv)
    with pytest.raises(ValueError, match="d_v"):
        fm.flash_mla_sparse_fwd(qs, kv, sidx, sc)  # default d_v=512 > d_qk=32
    with pytest.raises(ValueError, match="topk_length"):
        fm.flash_mla_sparse_fwd(qs, kv, sidx, sc, d_v=dv, topk_length=torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="indexer_topk"):
        fm.flash_mla_sparse_fwd(qs, kv, sidx, sc, d_v=dv, indexer_topk=sidx.shape[-1] + 1)


def test_no_host_reads_meta_tensors():
    """Every path runs on meta tensors, which hold no data: any host read of a length, index or table
    (a device sync on a GPU/NPU) would raise here."""
    dev, bf = "meta", torch.bfloat16
    q = torch.empty(5, 4, 32, device=dev, dtype=bf)
    kv = torch.empty(40, 1, 32, device=dev, dtype=bf)
    idx = torch.empty(5, 1, 8, dtype=torch.int32, device=dev)
    tl = torch.empty(5, dtype=torch.int32, device=dev)
    out, mx, lse, lse_i = fm.flash_mla_sparse_fwd(q, kv, idx, 0.1, d_v=16, topk_length=tl, indexer_topk=4)
    assert out.shape == (5, 4, 16) and mx.shape == lse.shape == lse_i.shape == (5, 4)
    qd = torch.empty(2, 2, 4, 32, device=dev, dtype=bf)
    cache = torch.empty(6, 8, 1, 32, device=dev, dtype=bf)
    bt = torch.empty(2, 3, dtype=torch.int32, device=dev)
    sl = torch.empty(2, dtype=torch.int32, device=dev)
    out, lse = fm.flash_mla_with_kvcache(qd, cache, bt, sl, 16, None, causal=True)
    assert out.shape == (2, 2, 4, 16) and lse.shape == (2, 4, 2)
    si = torch.empty(2, 2, 8, dtype=torch.int32, device=dev)
    out, lse = fm.flash_mla_with_kvcache(qd, cache, None, None, 16, None, indices=si, topk_length=sl,
                                         attn_sink=torch.empty(4, device=dev), extra_k_cache=cache,
                                         extra_indices_in_kvcache=si, extra_topk_length=sl)
    assert out.shape == (2, 2, 4, 16) and lse.shape == (2, 4, 2)
    q576 = torch.empty(2, 2, 4, 576, device=dev, dtype=bf)
    fp8 = torch.empty(6, 8, 1, 656, device=dev, dtype=torch.float8_e4m3fn)
    out, lse = fm.flash_mla_with_kvcache(q576, fp8, None, None, 512, None, indices=si, topk_length=sl,
                                         is_fp8_kvcache=True)
    assert out.shape == (2, 2, 4, 512) and lse.shape == (2, 4, 2)
    q512 = torch.empty(2, 2, 4, 512, device=dev, dtype=bf)
    model1 = torch.empty(6, 1152 + 576, device=dev, dtype=torch.uint8)[:, :2 * 584].view(6, 2, 1, 584)
    out, lse = fm.flash_mla_with_kvcache(q512, model1, None, None, 512, None, indices=si, topk_length=sl,
                                         is_fp8_kvcache=True)
    assert out.shape == (2, 2, 4, 512) and lse.shape == (2, 4, 2)


def test_sparse_fwd_gradients_match_the_native_op():
    """The shim adds only index masking around the op: gradients w.r.t. q and kv are the op's."""
    q, kv, idx, scale, d_v, sink, tl, _ = _make_sparse("topk_length", torch.float32)
    q1, kv1 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, mx, lse = fm.flash_mla_sparse_fwd(q1, kv1, idx, scale, d_v=d_v, topk_length=tl)
    assert mx.grad_fn is None  # the row max is a statistic
    (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
    q2, kv2 = q.clone().requires_grad_(), kv.clone().requires_grad_()
    idx_n = torch.where(torch.arange(idx.shape[-1])[None, None, :] < tl[:, None, None], idx, -1)
    out2 = attention.selective_attention(q2, kv2, idx_n, d_v=d_v, sm_scale=scale)
    (out2 * torch.arange(out2.numel()).reshape(out2.shape).sin()).sum().backward()
    assert torch.equal(q1.grad, q2.grad) and torch.equal(kv1.grad, kv2.grad)
    assert q1.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The V3.2 FP8 record as the op's quantized-cache arguments
# ---------------------------------------------------------------------------------------------

def test_unpack_fp8_kvcache_views_the_records_and_pack_inverts_it():
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(3, 4, 1, 576, generator=g).to(torch.bfloat16)
    fp8, _ = quantize_fp8_v32(cache)  # padded blocks: a non-contiguous cache
    kv_q, kv_scale, kv_rope = fm.unpack_fp8_kvcache(fp8)
    assert kv_q.shape == (3, 4, 1, 512) and kv_q.dtype == torch.float8_e4m3fn
    assert kv_scale.shape == (3, 4, 1, 4) and kv_scale.dtype == torch.float32
    assert kv_rope.shape == (3, 4, 1, 64) and kv_rope.dtype == torch.bfloat16
    for x in (kv_q, kv_scale, kv_rope):  # views: the same memory, nothing copied
        assert x.untyped_storage().data_ptr() == fp8.untyped_storage().data_ptr()
    assert torch.equal(kv_rope, cache[..., 512:])
    repacked = fm.pack_fp8_kvcache(kv_q, kv_scale, kv_rope)
    assert repacked.shape == (3, 4, 1, 656) and repacked.is_contiguous()
    assert torch.equal(repacked.view(torch.uint8), fp8.view(torch.uint8))
    # writing through a view writes the record
    kv_scale[1, 2, 0, 3] = 2.5
    assert fp8.view(torch.uint8)[1, 2, 0, 524:528].contiguous().view(torch.float32).item() == 2.5


def test_quantize_fp8_kvcache_is_quantize_kv_on_the_latent_part():
    g = torch.Generator().manual_seed(6)
    cache = torch.randn(2, 8, 1, 576, generator=g)
    kv_q, kv_scale, kv_rope = fm.unpack_fp8_kvcache(fm.quantize_fp8_kvcache(cache))
    want_q, want_scale = attention.quantize_kv(cache[..., :512], torch.float8_e4m3fn, 128)
    assert torch.equal(kv_q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(kv_scale, want_scale)
    assert torch.equal(kv_rope, cache[..., 512:].to(torch.bfloat16))


def test_fp8_decode_calls_the_op_natively(monkeypatch):
    """is_fp8_kvcache=True hands the op the float8 records themselves (views of the cache, with their
    scales): no dequantized copy is made in PyTorch."""
    g = torch.Generator().manual_seed(8)
    fp8, deq = quantize_fp8_v32(torch.randn(4, 8, 1, 576, generator=g).to(torch.bfloat16))
    q = torch.randn(2, 1, 4, 576, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, 40, (2, 1, 6), generator=g).to(torch.int32)
    seen = []
    real = fm.selective_attention

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(fm, "selective_attention", spy)
    out, lse = fm.flash_mla_with_kvcache(q, fp8, None, None, 512, None, indices=idx, is_fp8_kvcache=True)
    (args, kwargs), = seen
    kv = args[1]
    assert kv.dtype == torch.float8_e4m3fn and kv.untyped_storage().data_ptr() == fp8.untyped_storage().data_ptr()
    assert kwargs["kv_scale"].untyped_storage().data_ptr() == fp8.untyped_storage().data_ptr()
    assert kwargs["kv_rope"].untyped_storage().data_ptr() == fp8.untyped_storage().data_ptr()
    monkeypatch.setattr(fm, "selective_attention", real)
    r_out, r_lse = oracle_sparse_decode(q, [deq], [idx], [None], 576 ** -0.5, 512, None)
    _check(out, r_out, torch.bfloat16, "out")
    _check(lse, r_lse, torch.bfloat16, "lse", "lse")


@pytest.mark.parametrize("bad,exc,words", [
    (dict(kv_q=torch.zeros(2, 4, 1, 512, dtype=torch.int8)), TypeError, ["kv_q", "float8_e4m3fn"]),
    (dict(kv_scale=torch.ones(2, 4, 1, 3)), ValueError, ["kv_scale", "(2, 4, 1, 4)"]),
    (dict(kv_rope=torch.zeros(2, 4, 1, 64)), TypeError, ["kv_rope", "bfloat16"]),
])
def test_pack_fp8_kvcache_errors_name_the_argument(bad, exc, words):
    a = dict(kv_q=torch.zeros(2, 4, 1, 512, dtype=torch.float8_e4m3fn), kv_scale=torch.ones(2, 4, 1, 4),
             kv_rope=torch.zeros(2, 4, 1, 64, dtype=torch.bfloat16))
    a.update(bad)
    with pytest.raises(exc) as e:
        fm.pack_fp8_kvcache(**a)
    for w in words:
        assert w in str(e.value)


# ---------------------------------------------------------------------------------------------
# FlashMLA's MODEL1 FP8 cache: d_qk = 512 (448 e4m3 in 7 tiles of 64 with e8m0
# scales, 64 bfloat16 rope), 584 bytes per token, blocks padded to a multiple of 576 bytes
# ---------------------------------------------------------------------------------------------

def quantize_model1(cache):
    """bf16 [nb, page, 1, 512] -> a MODEL1 cache [nb, page, 1, 584] (a strided view of padded blocks) and
    its dequantized bfloat16 values, written from FlashMLA's layout description: per block, every token's
    448 float8 + 128 rope bytes, then every token's 7 e8m0 scale bytes + 1 padding byte."""
    nb, page = cache.shape[:2]
    x = cache[:, :, 0].float()
    nope = x[..., :448].reshape(nb, page, 7, 64)
    amax = nope.abs().amax(-1)
    scale = torch.pow(2.0, torch.ceil(torch.log2(torch.clamp_min(amax / 448.0, 1e-4))))  # power of two
    q8 = (nope / scale[..., None]).to(torch.float8_e4m3fn).reshape(nb, page, 448)
    block = -(-page * 584 // 576) * 576 + 576  # padded, and one spare record so blocks are not tight
    store = torch.zeros(nb, block, dtype=torch.uint8)
    data = torch.cat([q8.view(torch.uint8), cache[:, :, 0, 448:].contiguous().view(torch.uint8)], dim=-1)
    store[:, :page * 576] = data.reshape(nb, page * 576)
    e8 = scale.to(torch.float8_e8m0fnu).view(torch.uint8)  # exact: powers of two
    store[:, page * 576:page * 584].view(nb, page, 8)[:, :, :7] = e8
    deq = torch.cat([(q8.float().reshape(nb, page, 7, 64) * scale[..., None]).reshape(nb, page, 448)
                     .to(torch.bfloat16), cache[:, :, 0, 448:]], dim=-1)
    return store[:, :page * 584].view(torch.float8_e4m3fn).view(nb, page, 1, 584), deq.unsqueeze(2)


@pytest.mark.parametrize("case", ["mqa", "sink_topk_length", "extra_cache"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_sparse_fp8_model1(backend, case):
    q, cache, idx, scale, d_v, sink, tl, extra = _make_decode_sparse(case, torch.bfloat16)
    g = torch.Generator().manual_seed(11)
    b, s_q, h_q, _ = q.shape
    q = torch.randn(b, s_q, h_q, 512, generator=g).to(torch.bfloat16)
    m1, deq = quantize_model1(torch.randn(cache.shape[0], cache.shape[1], 1, 512, generator=g).to(torch.bfloat16))
    assert not m1.is_contiguous() and m1.shape[-1] == 584
    kw = dict(indices=idx, attn_sink=sink, topk_length=tl)
    caches, idxs, tls = [deq], [idx], [tl]
    if extra is not None:
        e1, edeq = quantize_model1(torch.randn(3, 4, 1, 512, generator=g).to(torch.bfloat16))
        kw.update(extra_k_cache=e1, extra_indices_in_kvcache=extra[1], extra_topk_length=extra[2])
        caches.append(edeq), idxs.append(extra[1]), tls.append(extra[2])
    out, lse = _skip_if_declined(backend, lambda: fm.flash_mla_with_kvcache(
        q, m1, None, None, 512, None, None, is_fp8_kvcache=True, backend=backend, **kw))
    assert out.shape == (b, s_q, h_q, 512) and lse.shape == (b, h_q, s_q)
    r_out, r_lse = oracle_sparse_decode(q, caches, idxs, tls, 512 ** -0.5, 512, sink)
    _check(out, r_out, torch.bfloat16, "out")
    _check(lse, r_lse, torch.bfloat16, "lse", "lse")


def test_unpack_model1_views_the_layout():
    g = torch.Generator().manual_seed(12)
    cache = torch.randn(3, 5, 1, 512, generator=g).to(torch.bfloat16)
    m1, deq = quantize_model1(cache)
    kv_q, s8, kv_rope = fm.unpack_model1_fp8_kvcache(m1)
    assert kv_q.shape == (3, 5, 1, 448) and s8.shape == (3, 5, 1, 7) and kv_rope.shape == (3, 5, 1, 64)
    assert s8.dtype == torch.float8_e8m0fnu and kv_rope.dtype == torch.bfloat16
    for x in (kv_q, s8, kv_rope):
        assert x.untyped_storage().data_ptr() == m1.untyped_storage().data_ptr()
    assert torch.equal(kv_rope, cache[..., 448:])
    back = python_ref.dequantize(kv_q, s8.to(torch.float32), 64).to(torch.bfloat16)
    assert torch.equal(back, deq[..., :448])
