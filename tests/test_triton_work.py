"""bench.work's counter of executed work (docs/triton.md "Counting executed work"), proven on cases
whose counts are known by hand, and the launch plan for a named target GPU (ATTENTION_TRITON_TARGET)
on CPU tensors."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the work counter instruments Triton's interpreter", allow_module_level=True)

import triton.language as tl  # noqa: E402

from attention.backends.triton import launch  # noqa: E402
from bench import work  # noqa: E402


@triton.jit
def _dot_and_masked_load(A, B, C, n_valid, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])                          # M*K elements
    b = tl.load(B + rk[:, None] * N + rn[None, :], mask=rk[:, None] < n_valid, other=0.0)  # n_valid*N
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b, input_precision="ieee"))


def test_counter_on_a_trivial_kernel():
    """One 16x32 @ 32x16 dot (2*16*16*32 FLOPs), A loaded fully, B with 5 of 32 rows unmasked."""
    a, b = torch.randn(16, 32), torch.randn(32, 16)
    c = torch.empty(16, 16)
    with work.WorkCounter({"a": a, "b": b}) as wc:
        _dot_and_masked_load[(1,)](a, b, c, 5, M=16, N=16, K=32)
    assert wc.flops == 2 * 16 * 16 * 32 and wc.dots == 1
    assert wc.bytes["a"] == 16 * 32 * 4
    assert wc.bytes["b"] == 5 * 16 * 4
    assert wc.bytes.get("other", 0) == 0
    b5 = b.clone()
    b5[5:] = 0
    assert torch.allclose(c, a @ b5, atol=1e-5)
    # Outside the context the interpreter is restored: nothing more is counted.
    _dot_and_masked_load[(1,)](a, b, c, 5, M=16, N=16, K=32)
    assert wc.flops == 2 * 16 * 16 * 32


def test_bench_work_tiny_preset_counts_by_hand(capsys):
    """The 'tiny' preset: one token, 16 heads, 32-wide rows whose first 16 columns are the value,
    16 candidates, planned for the H200 (the latent kernel's 32-row tiles, LATENT_BLOCK_N): one
    program, one tile of 32 slots of which 16 are kept. By hand: dots 16x16 @ 16x32 (k_nope .
    q_nope^T), 16x16 @ 16x32 (the 16-column tail) and 16x32 @ 32x16 (p . v); kv bytes = 16 rows x
    32 columns x 2 B, each row once; q = 16 x 32 x 2 B; the 16 int32 indices twice (the first pass
    that finds where the kept candidates end, then the tile)."""
    p = work.WORK_PRESETS["tiny"][0]
    row = work.measure(p, "NVIDIA H200")
    assert row["plan"]["kernel"] == "latent" and row["plan"]["BLOCK_N"] == 32 and row["plan"]["num_splits"] == 1
    assert row["flops_executed"] == 3 * (2 * 16 * 32 * 16)
    assert row["flops_useful"] == 2 * 16 * 16 * (32 + 16)
    assert row["bytes_loaded"]["kv"] == 16 * 32 * 2
    assert row["bytes_loaded"]["q"] == 16 * 32 * 2
    assert row["bytes_loaded"]["indices"] == 2 * 16 * 4
    assert row["bytes_ratio"]["kv"] == 1.0 and row["bytes_ratio"]["q"] == 1.0
    assert row["finite"]
    assert work.main(["--preset", "tiny"]) == 0
    assert "tiny/L=32" in capsys.readouterr().out


def test_target_plans_for_that_gpu_on_cpu_tensors(monkeypatch):
    """ATTENTION_TRITON_TARGET picks the target's config and SM count for CPU tensors."""
    import attention
    from bench.problems import make_inputs

    inp = attention.validate(**make_inputs(work.WORK_PRESETS["dsv32-decode"][1], "cpu").kwargs)  # 4 x 1 token
    assert launch.device_name(inp.device) == "cpu-interpreter"
    monkeypatch.setenv(launch.TARGET_ENV, "NVIDIA H200")
    assert launch.device_name(inp.device) == "NVIDIA H200" and launch.sm_count(inp.device) == 132
    cfg, source = launch.resolve_config(inp)
    assert source == "default"
    p = launch.plan(inp, cfg)
    # 4 tokens x 2 head blocks = 8 programs: 16 splits of 128 candidates fill 128 of 132 SMs.
    assert p["kernel"] == "latent" and p["NUM_HB"] == 2 and p["num_splits"] == 16
    monkeypatch.setenv(launch.TARGET_ENV, "no such GPU")
    with pytest.raises(ValueError, match="unknown device"):
        launch.sm_count(inp.device)


def test_decode_bucket_holds_the_number_of_tokens():
    import attention
    from bench.problems import make_inputs

    b64, b4 = (launch.shape_bucket(attention.validate(**make_inputs(p, "cpu").kwargs))
               for p in work.WORK_PRESETS["dsv32-decode"])
    assert b64 != b4 and b64.endswith("decode-t64-bfloat16") and b4.endswith("decode-t4-bfloat16")


@pytest.mark.parametrize("kv_quant", ["fp8", "int8"])
def test_quantized_cache_has_its_own_bucket_and_tile(kv_quant, monkeypatch):
    """A quantized cache compiles another kernel: a config tuned on a bfloat16 cache is not looked up for
    it (its own store bucket), and the H200 plan gives it 16-row latent tiles (32 spill on sm_90), while
    an override naming a tile names it for whichever kernel runs."""
    import attention
    from bench.problems import make_inputs

    monkeypatch.setenv(launch.TARGET_ENV, "NVIDIA H200")
    kw = make_inputs(work.WORK_PRESETS["dsv32-decode"][0], "cpu").kwargs
    plain = attention.validate(**kw)
    kw["kv"], kw["kv_scale"] = attention.quantize_kv(kw["kv"], work.KV_QUANT[kv_quant], work.SCALE_BLOCK)
    quant = attention.validate(**kw, scale_block=work.SCALE_BLOCK)
    assert launch.shape_bucket(quant) == launch.shape_bucket(plain) + "-kv" + str(kw["kv"].dtype)[len("torch."):]
    tiles = [launch.plan(x, launch.resolve_config(x, o)[0])["BLOCK_N"] for x in (plain, quant)
             for o in (None, {"BLOCK_N": 64}, {"LATENT_BLOCK_N": 64})]
    assert tiles == [32, 64, 64, 16, 64, 64]


@pytest.mark.parametrize("programs,n,expected", [(128, 2048, 1), (8, 2048, 16), (2, 2048, 16), (64, 2048, 2),
                                                 (8, 200, 1)])
def test_splits_fill_whole_waves(programs, n, expected):
    """132 SMs, min 128 candidates per split: the grid that best fills whole waves, fewest splits on a tie."""
    got = launch.choose_splits(programs, n, 64, 132, dict(min_per_split=128))
    assert got == expected


def test_latent_kernel_runs_no_tile_past_the_last_kept_candidate(monkeypatch):
    """A token keeping its first 5 of 128 candidates (the -1 padding of an early causal token) costs
    one 32-row tile of dots on the H200 plan, not four: the first pass over the indices ends the tile
    loop at the last kept candidate. A kept candidate at position 70 of the list runs tiles 0-2."""
    import attention
    from python_ref import selective_attention_dense

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 16, 32, generator=g)
    kv = torch.randn(256, 1, 32, generator=g)
    monkeypatch.setenv(launch.TARGET_ENV, "NVIDIA H200")
    per_tile = 3 * (2 * 32 * 16 * 16)  # k_nope . q^T, k_tail . q_tail^T, p . v: 32 rows, 16 heads, 16 columns
    for kept_at, tiles in ((range(5), 1), ([70], 3)):
        idx = torch.full((1, 1, 128), -1, dtype=torch.int32)
        idx[0, 0, list(kept_at)] = torch.arange(len(kept_at), dtype=torch.int32) * 7 + 1
        inp = attention.validate(q=q, kv=kv, indices=idx, d_v=16)
        assert launch.plan(inp, launch.resolve_config(inp)[0])["BLOCK_N"] == 32
        with work.WorkCounter() as wc:
            out, lse = launch.forward(inp, autotune=False)
        assert wc.flops == tiles * per_tile
        ref_out, ref_lse = selective_attention_dense(q, kv, idx, d_v=16)
        assert torch.allclose(out.double(), ref_out, atol=1e-4) and torch.allclose(lse.double(), ref_lse, atol=1e-4)


@pytest.mark.parametrize("kv_quant", ["fp8", "int8"])
def test_bench_work_counts_a_quantized_cache_by_hand(kv_quant):
    """The 'tiny' preset with its cache quantized: each kept row is read once as 32 one-byte
    values; its one float32 tile scale (32 columns < 128) is read twice, for the 16 value columns and
    for the 16-column tail, which share the tile (DeepSeek's 512 + 64 columns do not: tiles 0-3 and 4):
    40 B a row against 64 B in bfloat16. The H200 plan runs a quantized cache in 16-row tiles
    (QUANT_LATENT_BLOCK_N: 32-row ones spill on sm_90), so the three dots are those of one 16-row
    tile, every slot kept."""
    p = work.WORK_PRESETS["tiny"][0]
    row = work.measure(p, "NVIDIA H200", kv_quant)
    assert row["problem"] == f"{p.name}+{kv_quant}" and row["plan"]["kernel"] == "latent"
    assert row["plan"]["BLOCK_N"] == 16
    assert row["flops_executed"] == 3 * (2 * 16 * 16 * 16) == row["flops_useful"]
    assert row["bytes_loaded"]["kv"] == 16 * 32 and row["bytes_loaded"]["kv_scale"] == 2 * 16 * 4
    assert row["kv_bytes_per_row"] == 40.0 and work.measure(p, "NVIDIA H200")["kv_bytes_per_row"] == 64.0
    assert row["bytes_ratio"]["kv"] == 1.0 and row["bytes_ratio"]["kv_scale"] == 2.0 and row["finite"]
