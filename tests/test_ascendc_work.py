"""The twin's per-launch work counters (docs/ascendc.md "Work per core"): busy blocks and the bytes
each block's MTE2 reads from the kernel's inputs and from the workspace hand-over, for the main launch and
the combine launch of a decode split, checked against counts made independently from the problem.
bench/ascend_work.py reports them for DeepSeek shapes. Nothing here runs on an NPU.
"""

import pytest
import torch

import attention
from attention.testing import TOLERANCES, max_error, oracle

ascendc = pytest.importorskip("attention.backends.ascendc")
twin = ascendc._twin
pytestmark = pytest.mark.skipif(twin is None, reason=str(ascendc._TWIN_ERROR))


def _launch(args, soc="Ascend910B2", tiling=None):
    inp = attention.validate(**args)
    out, lse = ascendc.BACKEND.new_outputs(inp)
    return twin.forward(**ascendc.AscendCBackend._args(inp), out=out, lse=lse, soc=soc, tiling=tiling)


def _soc(name):
    return next(s for s in ascendc.soc_table() if s["name"] == name)


@pytest.mark.parametrize("tiling", [None, dict(numSplits=1), dict(nTile=16, numSplits=3)], ids=["planner", "unsplit", "split3"])
@pytest.mark.parametrize("soc", ["Ascend910B2", "Ascend310P3"])
def test_input_bytes_are_the_rows_the_kernel_needs(soc, tiling):
    """Each kept candidate's row is read once (dropped ones never), q once per split that computes its
    heads, and the combine launch reads each partial result once."""
    g = torch.Generator().manual_seed(5)
    T, H, Hkv, Dqk, Dr, S, K, Dv = 3, 8, 2, 40, 8, 50, 24, 16
    idx = torch.randint(-3, S + 5, (T, Hkv, K), generator=g, dtype=torch.int32)
    args = dict(q=torch.randn(T, H, Dqk, generator=g).half(), kv=torch.randn(S, Hkv, Dqk, generator=g).half(),
                q_rope=torch.randn(T, H, Dr, generator=g).half(), kv_rope=torch.randn(S, Hkv, Dr, generator=g).half(),
                indices=idx, d_v=Dv)
    rep = _launch(args, soc, tiling)
    splits, aic = rep["numSplits"], _soc(soc)["aic"]
    if tiling is None:
        # the planner's rule (host/tiling.cpp SplitsFor): floor(cube cores / (T * Hkv)) splits, at most one per tile
        assert splits == max(1, min(aic // (T * Hkv), rep["numTiles"]))
    else:
        assert splits == min(tiling["numSplits"], rep["numTiles"])
    kept = int(((idx >= 0) & (idx < S)).sum())  # duplicates count: each occurrence is gathered
    ins, qb = rep["twin_mte2_input_bytes"], rep["twin_mte2_query_bytes"]
    assert sum(ins) - sum(qb) == kept * (Dqk + Dr) * 2
    # the query part, counted apart by the twin: q and q_rope of every head once per split
    assert sum(qb) == splits * T * H * (Dqk + Dr) * 2
    assert all(q <= i for q, i in zip(qb, ins))
    # T * Hkv * splits items over min(items, cube cores) blocks, each of which did work
    assert rep["numItems"] == T * Hkv * splits and rep["blockDim"] == min(T * Hkv * splits, aic)
    assert all(b > 0 for b in ins)
    assert all(b > 0 for b in rep["twin_mte2_workspace_bytes"])  # the cube core reads its hand-over
    comb = rep["twin_combine_mte2_workspace_bytes"]
    if splits == 1:
        assert comb == [] and rep["partialBytes"] == 0
    else:
        # every (token, head, split): its O row (dvPad fp32) and its m, l, kept once; nothing from the inputs
        assert sum(comb) == T * H * splits * (16 + 3) * 4
        assert len(comb) == rep["combineBlockDim"] and all(b > 0 for b in comb)
        assert sum(rep["twin_combine_mte2_input_bytes"]) == 0


def _deepseek_decode(T, K=2048, S=4096):
    """DeepSeek-V3.2 decode: T tokens of 128 heads on one latent kv head, K distinct rows each."""
    g = torch.Generator().manual_seed(6 + T)
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)]).to(torch.int32).view(T, 1, K)
    return dict(q=torch.randn(T, 128, 576, generator=g).half(), kv=torch.randn(S, 1, 576, generator=g).half(),
                indices=idx, d_v=512)


@pytest.mark.parametrize("T", [1, 4])
def test_deepseek_decode_uses_most_cores_and_reads_each_row_once(T):
    """The decode split on a 910B2 (24 cube cores): the candidates of each token are split over the cores,
    at least 20 of them do work, and every selected kv row is read from GM exactly once (the query rows once
    per split: every core that computes a head needs its q; docs/ascendc.md has the bound)."""
    args = _deepseek_decode(T)
    inp = attention.validate(**args)
    out, lse = ascendc.BACKEND.new_outputs(inp)
    rep = twin.forward(**ascendc.AscendCBackend._args(inp), out=out, lse=lse, soc="Ascend910B2")
    ins = rep["twin_mte2_input_bytes"]
    busy = sum(1 for b in ins if b > 0)
    assert busy >= 20, (busy, rep["numSplits"], rep["nTile"])
    row_bytes = 576 * 2
    assert sum(ins) - sum(rep["twin_mte2_query_bytes"]) == T * 2048 * row_bytes
    assert sum(rep["twin_mte2_query_bytes"]) == rep["numSplits"] * T * 128 * row_bytes
    assert rep["numSplits"] > 1 and len(rep["twin_combine_mte2_workspace_bytes"]) == rep["combineBlockDim"] > 0
    want_out, want_lse = oracle(args)
    tol_out, tol_lse = TOLERANCES[torch.float16]
    assert max_error(out, want_out) <= tol_out and max_error(lse, want_lse) <= tol_lse


@pytest.mark.parametrize("splits,gather_once", [(1, False), (2, True)])
def test_head_tiles_reuse_the_gathered_rows_when_a_split_fits_the_slots(splits, gather_once):
    """Several head tiles per kv head (32 heads, mTile 16): a split of at most MAX_KV_SLOTS (8) tiles is
    gathered once and re-used by both head tiles; a longer one (13 tiles, unsplit) is gathered again for each
    head tile through the two-slot ping-pong. Both match the float64 oracle."""
    g = torch.Generator().manual_seed(9)
    T, H, D, Dv, S, K = 2, 32, 48, 32, 400, 200
    idx = torch.randint(-5, S + 5, (T, 1, K), generator=g, dtype=torch.int32)
    args = dict(q=torch.randn(T, H, D, generator=g), kv=torch.randn(S, 1, D, generator=g), indices=idx, d_v=Dv,
                attn_sink=torch.randn(H, generator=g))
    inp = attention.validate(**args)
    out, lse = ascendc.BACKEND.new_outputs(inp)
    tiling = dict(mTile=16, nTile=16, numSplits=splits)
    rep = twin.forward(**ascendc.AscendCBackend._args(inp), out=out, lse=lse, soc="Ascend910B2", tiling=tiling)
    assert (rep["numTiles"], rep["numSplits"], rep["gatherOnce"]) == (13, splits, gather_once)
    kept = int(((idx >= 0) & (idx < S)).sum())
    rows = sum(rep["twin_mte2_input_bytes"]) - sum(rep["twin_mte2_query_bytes"])
    assert rows == kept * D * 4 * (1 if gather_once else H // 16)
    want_out, want_lse = oracle(args)
    tol_out, tol_lse = TOLERANCES[torch.float32]
    assert max_error(out, want_out) <= tol_out and max_error(lse, want_lse) <= tol_lse


@pytest.mark.parametrize("separate_v", [False, True], ids=["latent", "separate_v"])
def test_int8_cache_reads_kept_rows_as_int8(separate_v):
    """An int8 kv (and v) is gathered as int8 with its tile scales, only for kept candidates:
    Dqk bytes + ceil(Dqk / scale_block) float32 scales per kept row (+ the same for v), about half of the
    16-bit row."""
    from attention import quantize_kv

    g = torch.Generator().manual_seed(8)
    T, H, Hkv, Dqk, Dr, Dv, S, K, sb = 3, 8, 2, 40, 8, 24, 50, 24, 16
    idx = torch.randint(-3, S + 5, (T, Hkv, K), generator=g, dtype=torch.int32)
    kv, kv_scale = quantize_kv(torch.randn(S, Hkv, Dqk, generator=g), torch.int8, sb)
    args = dict(q=torch.randn(T, H, Dqk, generator=g).half(), kv=kv, kv_scale=kv_scale, scale_block=sb,
                q_rope=torch.randn(T, H, Dr, generator=g).half(), kv_rope=torch.randn(S, Hkv, Dr, generator=g).half(),
                indices=idx)
    row = Dqk + 4 * -(-Dqk // sb) + Dr * 2  # int8 values, float32 scales, 16-bit rope
    if separate_v:
        args["v"], args["v_scale"] = quantize_kv(torch.randn(S, Hkv, Dv, generator=g), torch.int8, sb)
        row += Dv + 4 * -(-Dv // sb)
    else:
        args["d_v"] = 16
    rep = _launch(args)
    kept = int(((idx >= 0) & (idx < S)).sum())
    assert sum(rep["twin_mte2_input_bytes"]) - sum(rep["twin_mte2_query_bytes"]) == kept * row
    assert sum(rep["twin_mte2_query_bytes"]) == rep["numSplits"] * T * H * (Dqk + Dr) * 2
