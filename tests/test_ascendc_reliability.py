"""Reliability regressions on the AscendC backend (CPU twin): 64-bit candidate counts, NaN/inf in a
kept candidate, the binding's own argument checks and per-launch SoC limits.
Each test here failed on the code before its fix. Nothing here runs on an NPU.
"""

import os
import subprocess
import sys
import threading

import pytest
import torch

import attention
from attention.testing import CASES, TOLERANCES, oracle

ascendc = pytest.importorskip("attention.backends.ascendc")
twin = ascendc._twin
pytestmark = pytest.mark.skipif(twin is None, reason=str(ascendc._TWIN_ERROR))


def _twin_call(args, soc="Ascend910B2", tiling=None, **kw):
    inp = attention.validate(**args)
    out, lse = ascendc.BACKEND.new_outputs(inp)
    twin.forward(**ascendc.AscendCBackend._args(inp), out=out, lse=lse, soc=soc, tiling=tiling, **kw)
    return out, lse


# ---------------------------------------------------------------- K * block_size >= 2**41
def test_huge_block_count_does_not_wrap():
    """K * block_size = 2**41 + 2**20 candidate slots over a 1-row cache. The tile count used to be
    ceil(K * block_size / nTile) in 32 bits (2**32 + 2048 -> 2048 tiles of 512): every index but the
    first was silently dropped. Offsets of a block past the cache are now clipped before the count, so
    the work is K * min(block_size, rows) slots, counted in 64 bits."""
    g = torch.Generator().manual_seed(11)
    K, bs, S = 2 ** 21 + 1, 2 ** 20, 1
    q = torch.randn(1, 4, 16, generator=g)
    kv = torch.randn(S, 1, 16, generator=g)
    idx = torch.full((1, 1, K), -1, dtype=torch.int32)
    idx[0, 0, [5, K // 2, K - 1]] = 0  # the last one starts at slot 2**41
    out, lse = _twin_call(dict(q=q, kv=kv, indices=idx, block_size=bs))
    # the same multiset of kept positions spelled as token indices: each index 0 keeps positions 0..S-1
    small = torch.arange(S, dtype=torch.int32).repeat(3).view(1, 1, -1)
    ref_out, ref_lse = oracle(dict(q=q, kv=kv, indices=small))
    assert (out.double() - ref_out).abs().max() <= TOLERANCES[torch.float32][0]
    assert (lse.double() - ref_lse).abs().max() <= TOLERANCES[torch.float32][1]


def test_plan_counts_candidate_tiles_in_64_bits():
    """The host's tile count for K * block_size past 2**32 * nTile, with no cache bound given."""
    p = ascendc.plan(dict(T=1, H=16, Dqk=64, Dv=64, K=2 ** 23 + 1, block_size=2 ** 18, dtype="float16"))
    assert p["numTiles"] * p["nTile"] >= (2 ** 23 + 1) * 2 ** 18
    # with a cache bound, offsets past it are not slots at all
    q = ascendc.plan(dict(T=1, H=16, Dqk=64, Dv=64, K=2 ** 23 + 1, block_size=2 ** 18, dtype="float16",
                          max_seqlen=100))
    assert q["numTiles"] == -(-(2 ** 23 + 1) * 100 // q["nTile"])


# ---------------------------------------------------------------- NaN / inf in a kept candidate
def _nonfinite_case(bad, latent=True):
    g = torch.Generator().manual_seed(4)
    T, S = 4, 12
    q = torch.randn(T, 4, 16, generator=g)
    kv = torch.randn(S, 1, 16, generator=g)
    v = None if latent else torch.randn(S, 1, 8, generator=g)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5], [5, 6, -1], [7, 8, 9]], dtype=torch.int32).view(T, 1, 3)
    (kv if latent else v)[5, 0, 2] = bad  # row 5 is kept by tokens 1 and 2 only
    args = dict(q=q, kv=kv, indices=idx, attn_sink=torch.randn(4, generator=g))
    if latent:
        args["d_v"] = 8
    else:
        args["v"] = v
    return args


@pytest.mark.parametrize("soc", ["Ascend910B2", "Ascend310P3"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("latent", [True, False], ids=["latent", "separate_v"])
def test_nonfinite_kept_candidate_propagates(soc, bad, latent):
    """A kept candidate holding NaN/inf is not "no candidate": out and lse become non-finite exactly
    where the float64 evaluation's are, and the other tokens are untouched."""
    dtype = torch.float16 if soc == "Ascend310P3" else torch.float32
    args = _nonfinite_case(bad, latent)
    args = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "attn_sink" else v)
            for k, v in args.items()}
    ref_out, ref_lse = oracle(args)
    with ascendc.use_soc(soc):
        out, lse = attention.selective_attention(**args, return_lse=True, backend="ascendc")
    bad_rows = ~torch.isfinite(ref_out).all(-1) | ~torch.isfinite(ref_lse)
    assert bad_rows[1:3].all() and not bad_rows[[0, 3]].any()  # the case is what it claims
    assert (~torch.isfinite(out.double()).all(-1) == ~torch.isfinite(ref_out).all(-1)).all()
    assert torch.isnan(out.double()).any(-1).eq(torch.isnan(ref_out).any(-1)).all()
    # lse: NaN where float64 has NaN; where float64 has +inf the online softmax gives NaN (inf - inf in
    # the running-max rescale), documented in docs/ascendc.md; never the "empty row" -inf
    assert (torch.isfinite(lse) == torch.isfinite(ref_lse)).all()
    assert not (lse[bad_rows] == float("-inf")).any()
    tol_out, tol_lse = TOLERANCES[dtype]
    good = ~bad_rows
    assert (out[good].double() - ref_out[good]).abs().max() <= tol_out
    assert (lse[good].double() - ref_lse[good]).abs().max() <= tol_lse


# ---------------------------------------------------------------- the binding checks its arguments
def _paged_args():
    case = next(c for c in CASES if c.name == "paged")
    inp = attention.validate(**case.make(torch.float32))
    out, lse = ascendc.BACKEND.new_outputs(inp)
    return ascendc.AscendCBackend._args(inp), out, lse


def test_binding_page_size_zero_is_a_value_error():
    a, out, lse = _paged_args()
    P, _, Hkv, D = a["kv"].shape
    bad = dict(a, kv=torch.empty(P, 0, Hkv, D), seqlens_k=torch.zeros_like(a["seqlens_k"]))
    with pytest.raises(ValueError, match=r"page size \(kv.shape\[1\]\) >= 1"):
        twin.forward(**bad, out=out, lse=lse, soc="Ascend910B2")


def test_binding_page_size_zero_does_not_kill_the_process():
    """Called the way the adversarial review did (a fresh process, straight into the binding): the
    process used to die with SIGFPE; it must survive with a Python exception."""
    code = (
        "import torch, attention\n"
        "from attention.backends.ascendc import _twin\n"
        "kv = torch.empty(3, 0, 1, 16)\n"
        "args = dict(q=torch.randn(2, 4, 16), q_rope=None, kv=kv, kv_rope=None, v=None,\n"
        "            indices=torch.zeros(2, 1, 3, dtype=torch.int32),\n"
        "            cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32), cu_seqlens_k=None,\n"
        "            block_table=torch.zeros(1, 2, dtype=torch.int32), seqlens_k=torch.zeros(1, dtype=torch.int32),\n"
        "            attn_sink=None, out=torch.empty(2, 4, 8), lse=torch.empty(2, 4), sm_scale=0.25, d_v=8,\n"
        "            block_size=1, causal=False, soc='Ascend910B2')\n"
        "try:\n"
        "    _twin.forward(**args)\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert "ValueError" in res.stdout and "page size" in res.stdout, res.stdout


@pytest.mark.parametrize("call, exc, message", [
    (lambda: twin.plan("Ascend910B2", dict(T="many")), TypeError, "shape field T has the wrong type"),
    (lambda: twin.plan("Ascend910B2", dict(K=2 ** 40)), ValueError, "shape field K out of range"),
    (lambda: twin.plan("Ascend910B2", dict(H=0)), ValueError, "H must be a positive multiple of Hkv"),
    (lambda: twin.plan("Ascend910B2", dict(dtype=3)), TypeError, "shape field dtype"),
    (lambda: twin.plan("Ascend910B2", {}, [16]), TypeError, "tiling must be a dict"),
    (lambda: twin.plan("Ascend910B2", {}, dict(mTile="x")), TypeError, "tiling override mTile"),
    (lambda: twin.plan("Ascend999", {}), ValueError, "unknown SoC"),
])
def test_plan_entry_point_checks_its_arguments(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_binding_rejects_sm_scale_beyond_float32():
    case = CASES[0]
    inp = attention.validate(**case.make(torch.float32))
    out, lse = ascendc.BACKEND.new_outputs(inp)
    a = dict(ascendc.AscendCBackend._args(inp), sm_scale=1e300)
    with pytest.raises(ValueError, match="sm_scale must be finite in float32"):
        twin.forward(**a, out=out, lse=lse, soc="Ascend910B2")


# ---------------------------------------------------------------- SoC limits per launch
def test_concurrent_launches_for_different_socs():
    """Two threads, one running the twin as Ascend310P3 with a tiling that needs its 1 MB L1, one as
    Ascend910B2 (512 KB L1). With process-global limits the 310P3 launch saw the 910B2 capacity and
    raised a false CapacityError; the same sharing could let a real 910B2 overflow pass."""
    g = torch.Generator().manual_seed(8)
    args = dict(q=torch.randn(1, 16, 576, generator=g).half(), kv=torch.randn(300, 1, 576, generator=g).half(),
                indices=torch.randint(0, 300, (1, 1, 192), generator=g, dtype=torch.int32), d_v=512)
    l1_heavy = dict(mTile=16, nTile=192, dkChunk=64, dvChunk=64, vecBufNum=1, kvBufNum=2, l0BufNum=1)
    small = dict(mTile=16, nTile=16, dkChunk=16, dvChunk=16, vecBufNum=1, kvBufNum=1, l0BufNum=1)
    errors = {"310P3": [], "910B2": [], "910B2_overflow_missed": 0}
    barrier = threading.Barrier(2)

    def run_310p3():
        barrier.wait()
        for _ in range(6):
            try:
                _twin_call(args, soc="Ascend310P3", tiling=l1_heavy)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors["310P3"].append(repr(e))

    def run_910b2():
        barrier.wait()
        for i in range(6):
            if i % 2:
                try:  # the same tiling must overflow 910B2's L1 in the twin's TPipe
                    _twin_call(args, soc="Ascend910B2", tiling=l1_heavy, check_fit=False)
                    errors["910B2_overflow_missed"] += 1
                except twin.CapacityError:
                    pass
            else:
                try:
                    _twin_call(args, soc="Ascend910B2", tiling=small)
                except Exception as e:  # noqa: BLE001
                    errors["910B2"].append(repr(e))

    threads = [threading.Thread(target=run_310p3), threading.Thread(target=run_910b2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == {"310P3": [], "910B2": [], "910B2_overflow_missed": 0}


def test_use_soc_is_per_thread():
    seen = {}
    with ascendc.use_soc("Ascend310P3"):
        th = threading.Thread(target=lambda: seen.setdefault("other", ascendc.current_soc()))
        th.start()
        th.join()
        seen["here"] = ascendc.current_soc()
    assert seen == {"here": "Ascend310P3", "other": ascendc.DEFAULT_SOC if not os.environ.get(
        "ATTENTION_ASCEND_SOC") else os.environ["ATTENTION_ASCEND_SOC"].strip()}
