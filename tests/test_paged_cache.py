"""PagedLatentCache on its own (no transformers): storage, paging, and attention over it on every
CPU-testable backend against the float64 oracle on the same rows laid out contiguously."""

import pytest
import torch

import attention
import python_ref
from _helpers import skip_if_declined as _skip_if_declined
from attention.integrations import PagedLatentCache
from attention.testing import oracle

CPU_BACKENDS = [b.name for b in attention.backends() if "cpu" in b.test_devices()]


def _two_sequence_indices(K, gen):
    """[3, 1, K] int32: two query tokens of a 9-row sequence, then one of a 5-row sequence padded with -1."""
    idx = torch.stack([torch.randperm(9, generator=gen)[:K] for _ in range(2)] +
                      [torch.cat([torch.randperm(5, generator=gen)[:K - 1], torch.tensor([-1])])])
    return idx.to(torch.int32).unsqueeze(1)


def _fill(cache, steps, R, Dr, gen):
    """Append `steps` (a list of per-sequence row counts); return the rows each sequence got."""
    rows = [([], []) for _ in range(cache.batch_size)]
    for lengths in steps:
        n = sum(lengths)
        lat = torch.randn(n, R, generator=gen)
        rope = torch.randn(n, Dr, generator=gen)
        cache.append(lat, rope, lengths=lengths)
        start = 0
        for b, m in enumerate(lengths):
            rows[b][0].append(lat[start:start + m])
            rows[b][1].append(rope[start:start + m])
            start += m
    return [(torch.cat(a), torch.cat(r)) for a, r in rows]


def test_append_ragged_prefill_then_decode_keeps_every_row():
    gen = torch.Generator().manual_seed(0)
    cache = PagedLatentCache(3, kv_lora_rank=8, rope_dim=4, page_size=4)
    # prefill of ragged lengths (one sequence empty), then decode steps where one slot sits out
    rows = _fill(cache, [[5, 0, 9], [1, 1, 1], [1, 0, 1], [3, 4, 0]], 8, 4, gen)
    assert cache.lengths == [10, 5, 11]
    assert cache.seqlens_k.tolist() == [10, 5, 11]
    for b in range(3):
        lat, rope = cache.gather(b)
        assert torch.equal(lat, rows[b][0]) and torch.equal(rope, rows[b][1])
        pages = cache.block_table[b]
        used = -(-cache.lengths[b] // 4)
        assert (pages[:used] >= 0).all() and (pages[used:] == -1).all()
    # no page is shared between two sequences
    used_pages = [p for b in range(3) for p in cache.block_table[b].tolist() if p >= 0]
    assert len(used_pages) == len(set(used_pages)) == 3 + 2 + 3


def test_memory_is_latent_sized():
    cache = PagedLatentCache(2, kv_lora_rank=512, rope_dim=64, page_size=64)
    cache.append(torch.zeros(128, 512), torch.zeros(128, 64), lengths=[64, 64])
    pages = cache.num_pages
    assert pages == 2
    assert cache.kv.numel() + cache.kv_rope.numel() == pages * 64 * 576


def test_reset_reuses_pages():
    cache = PagedLatentCache(1, 4, 2, page_size=2)
    cache.append(torch.ones(5, 4), torch.ones(5, 2))
    pool = cache.num_pages
    cache.reset()
    assert cache.lengths == [0] and cache.block_table.shape[1] == 0
    cache.append(torch.ones(5, 4), torch.ones(5, 2))
    assert cache.num_pages == pool


def test_bad_append_names_the_problem():
    cache = PagedLatentCache(2, 4, 2)
    with pytest.raises(ValueError, match="lengths"):
        cache.append(torch.ones(3, 4), torch.ones(3, 2), lengths=[1, 1])
    with pytest.raises(ValueError, match="split evenly"):
        cache.append(torch.ones(3, 4), torch.ones(3, 2))
    with pytest.raises(ValueError, match="rope"):
        cache.append(torch.ones(2, 4), torch.ones(3, 2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_over_paged_cache_equals_contiguous(backend):
    """Latent-mode attention through the cache's kwargs == the oracle on the same rows, contiguous."""
    gen = torch.Generator().manual_seed(1)
    R, Dr, H, K = 16, 8, 4, 6
    cache = PagedLatentCache(2, R, Dr, page_size=4)
    rows = _fill(cache, [[7, 3], [1, 1], [1, 1]], R, Dr, gen)  # lengths 9 and 5
    q_lens = [2, 1]  # the last tokens of each sequence query (bottom-right causal)
    T = sum(q_lens)
    q = torch.randn(T, H, R, generator=gen)
    q_rope = torch.randn(T, H, Dr, generator=gen)
    # two queries of sequence 0 (9 rows), one of sequence 1 (5 rows, padded with -1)
    idx = _two_sequence_indices(K, gen)
    cu_q = torch.tensor([0, 2, 3], dtype=torch.int32)
    scale = 0.3
    out = attention.selective_attention(q, indices=idx, q_rope=q_rope, sm_scale=scale, cu_seqlens_q=cu_q,
                                        causal=True, backend=backend, **cache.attention_kwargs())
    kv = torch.cat([r[0] for r in rows]).unsqueeze(1)
    kv_rope = torch.cat([r[1] for r in rows]).unsqueeze(1)
    ref, _ = oracle(dict(q=q, kv=kv, indices=idx, d_v=R, q_rope=q_rope, kv_rope=kv_rope, sm_scale=scale,
                         cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, 9, 14], dtype=torch.int32),
                         causal=True))
    assert out.shape == (T, H, R)
    assert (out.double() - ref).abs().max().item() <= 1e-4
    assert out.abs().max().item() > 0.1  # the rows read real data, not an empty selection


# ---- quantized caches ----
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantized_cache_quantizes_on_append(backend, dtype):
    """append quantizes each new row (quantize_kv: per token, tiles of scale_block); attention through the
    cache's kwargs equals the oracle on the same rows quantized at once and laid out contiguously."""
    gen = torch.Generator().manual_seed(2)
    R, Dr, H, K, sb = 24, 8, 4, 6, 16  # two tiles per row, the second one shorter
    cache = PagedLatentCache(2, R, Dr, page_size=4, dtype=dtype, scale_block=sb, rope_dtype=torch.float32)
    rows = _fill(cache, [[7, 3], [1, 1], [1, 1]], R, Dr, gen)
    kw = cache.attention_kwargs()
    assert kw["kv"].dtype == dtype and kw["kv_scale"].shape == (cache.num_pages, 4, 1, 2)
    assert kw["scale_block"] == sb and kw["kv_rope"].dtype == torch.float32
    T = 3
    q = torch.randn(T, H, R, generator=gen)
    q_rope = torch.randn(T, H, Dr, generator=gen)
    idx = _two_sequence_indices(K, gen)
    cu_q = torch.tensor([0, 2, 3], dtype=torch.int32)
    out = _skip_if_declined(backend, lambda: attention.selective_attention(
        q, indices=idx, q_rope=q_rope, sm_scale=0.3, cu_seqlens_q=cu_q, causal=True, backend=backend, **kw))
    kv_q, kv_scale = attention.quantize_kv(torch.cat([r[0] for r in rows]).unsqueeze(1), dtype, sb)
    kv_rope = torch.cat([r[1] for r in rows]).unsqueeze(1)
    ref, _ = oracle(dict(q=q, kv=kv_q, kv_scale=kv_scale, scale_block=sb, indices=idx, d_v=R, q_rope=q_rope,
                         kv_rope=kv_rope, sm_scale=0.3, cu_seqlens_q=cu_q,
                         cu_seqlens_k=torch.tensor([0, 9, 14], dtype=torch.int32), causal=True))
    assert (out.double() - ref).abs().max().item() <= 1e-4
    assert out.abs().max().item() > 0.1
    # gather() returns what the op reads: the dequantized rows
    lat, _ = cache.gather(0)
    assert torch.equal(lat, python_ref.dequantize(kv_q[:9, 0], kv_scale[:9, 0], sb))


def test_quantized_cache_memory_is_656_bytes_per_deepseek_token():
    fp8 = PagedLatentCache(1, 512, 64, page_size=64, dtype=torch.float8_e4m3fn)
    bf16 = PagedLatentCache(1, 512, 64, page_size=64, dtype=torch.bfloat16)
    for c in (fp8, bf16):
        c.append(torch.randn(64, 512), torch.randn(64, 64))
    assert fp8.used_bytes() == 64 * 656 and bf16.used_bytes() == 64 * 1152
    grown = PagedLatentCache(1, 512, 64, page_size=4, dtype=torch.int8)
    grown.append(torch.randn(9, 512), torch.randn(9, 64))  # grows the pool: the scales grow with it
    assert grown.kv_scale.shape[0] == grown.num_pages >= 3


@pytest.mark.parametrize("kw,exc,word", [(dict(dtype=torch.float8_e5m2), TypeError, "dtype"),
                                        (dict(dtype=torch.int8, scale_block=0), ValueError, "scale_block"),
                                        (dict(dtype=torch.int8, rope_dtype=torch.int8), TypeError, "rope_dtype")])
def test_quantized_cache_bad_options(kw, exc, word):
    with pytest.raises(exc, match=word):
        PagedLatentCache(1, 16, 8, **kw)
