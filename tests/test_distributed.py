"""Context parallelism on real processes: torch.multiprocessing spawn, gloo on CPU, world sizes 1-4.

Every rank builds the same whole problem from one seed, keeps only its shard of the cache (contiguous
or paged with NaN garbage pages and -1 padded tables), runs attention.distributed, and checks the
result against the float64 oracle of the whole cache (docs/spec.md tolerances) and the single-device
call; selection must equal ``attention.select`` on the whole cache exactly. Many checks share one
spawned group (spawning costs seconds per process here). A worker that hangs in a collective is
killed at the deadline, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attention
import python_ref
from attention.distributed import ShardLayout, choose_combine, combine_bytes

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 1e-2), torch.bfloat16: (3e-2, 1e-2)}
DEADLINE_S = 120  # whole group, spawn included; a collective that waits this long is a hang


# ----------------------------------------------------------------------------- spawning
def _entry(rank, world, store_path, scenario, errfile):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        SCENARIOS[scenario](rank, world)
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_group(world, scenario, tmp_path):
    store = str(tmp_path / f"store-{scenario}-{world}")
    errfile = str(tmp_path / f"err-{scenario}-{world}")
    ctx = mp.start_processes(_entry, args=(world, store, scenario, errfile), nprocs=world, join=False,
                             start_method="spawn")
    t0 = time.monotonic()
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() - t0 > DEADLINE_S:
                pytest.fail(f"{scenario} with {world} ranks still running after {DEADLINE_S} s (hang)")
    except mp.ProcessRaisedException:
        msgs = [open(f"{errfile}.{r}").read() for r in range(world) if os.path.exists(f"{errfile}.{r}")]
        pytest.fail("\n".join(msgs))
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# ----------------------------------------------------------------------------- problem builders
def _uneven(L, world, seed):
    """Uneven contiguous ranges with empty shards: rank 1 empty whenever world >= 3."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(0, L + 1, (world - 1,), generator=g).tolist())
    if world >= 3:
        cuts[1] = cuts[0]  # rank 1 holds nothing
    return [0] + cuts + [L]


def _layout(lens, world, seed):
    return ShardLayout(tuple(tuple(_uneven(L, world, seed + b)) for b, L in enumerate(lens)))


def _cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def _paged(x, layout, rank, cu_k, page, seed):
    """This rank's shard of the whole contiguous cache x, in pages: (pool, block_table). Unused pages
    hold NaN; table rows are padded with -1."""
    lens = layout.lengths(rank)
    npages = [-(-n // page) for n in lens]
    P = sum(npages) + 2
    maxp = max(npages + [1]) + 1
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(seed + rank)).tolist()
    pool = torch.full((P, page) + tuple(x.shape[1:]), float("nan"), dtype=x.dtype)
    table = torch.full((len(lens), maxp), -1, dtype=torch.int32)
    rows = layout.shard(x, rank, cu_k)
    r0, used = 0, 0
    for b, n in enumerate(lens):
        for j in range(npages[b]):
            pid = perm[used]
            used += 1
            table[b, j] = pid
            chunk = rows[r0 + j * page: r0 + min(n, (j + 1) * page)]
            pool[pid, :chunk.shape[0]] = chunk
        r0 += n
    return pool, table


def _check_attn(out, lse, ref_out, ref_lse, dtype, what):
    atol_o, atol_l = TOL[dtype]
    assert out.dtype == dtype, what
    err = (out.double() - ref_out.double()).abs().max().item()
    assert err <= atol_o, f"{what}: out error {err}"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), what
    if fin.any():
        el = (lse.double()[fin] - ref_lse.double()[fin]).abs().max().item()
        assert el <= atol_l, f"{what}: lse error {el}"


# ----------------------------------------------------------------------------- attention scenarios
ATTN_CASES = [
    # name, lens, q per seq, H, Hkv, D, Dr, Dv (latent d_v, or separate v if sep), sep, K, block, page, dtype
    dict(name="mla-latent-contig", lens=[61], lq=[3], H=8, Hkv=1, D=40, Dr=8, Dv=32, sep=False, K=24, block=1,
         page=0, dtype=torch.float32, causal=True, sink=True),
    dict(name="gqa-sepv-paged-varlen-block", lens=[37, 50], lq=[2, 3], H=4, Hkv=2, D=16, Dr=0, Dv=24, sep=True,
         K=6, block=4, page=8, dtype=torch.float32, causal=True, sink=True),
    dict(name="mha-bf16-contig-varlen-block", lens=[29, 0, 45], lq=[4, 1, 2], H=2, Hkv=2, D=32, Dr=0, Dv=32,
         sep=False, K=5, block=3, page=0, dtype=torch.bfloat16, causal=False, sink=False),
]


def _attn_problem(c, seed):
    g = torch.Generator().manual_seed(seed)
    lens, lq = c["lens"], c["lq"]
    S, T = sum(lens), sum(lq)
    dt = c["dtype"]
    q = torch.randn(T, c["H"], c["D"], generator=g).to(dt)
    kv = torch.randn(S, c["Hkv"], c["D"], generator=g).to(dt)
    v = torch.randn(S, c["Hkv"], c["Dv"], generator=g).to(dt) if c["sep"] else None
    q_rope = torch.randn(T, c["H"], c["Dr"], generator=g).to(dt) if c["Dr"] else None
    kv_rope = torch.randn(S, c["Hkv"], c["Dr"], generator=g).to(dt) if c["Dr"] else None
    cols = []
    for b, n in enumerate(lq):
        units = -(-lens[b] // c["block"])
        cols.append(torch.randint(-2, units + 3, (n, c["Hkv"], c["K"]), generator=g, dtype=torch.int32))
    idx = torch.cat(cols)
    idx[0] = -1  # a token with no candidate anywhere: out 0, lse -inf
    idx[1] = 0  # a token whose candidates (K copies of one) all live on one rank: the others have none
    sink = torch.randn(c["H"], generator=g) if c["sink"] else None
    return q, kv, v, q_rope, kv_rope, idx, sink, _cu(lq), _cu(lens)


def _straddled(layout, block):
    return block > 1 and any(layout.boundary_blocks(block))


def _scenario_attention(rank, world):
    straddled = 0
    for ci, c in enumerate(ATTN_CASES):
        q, kv, v, q_rope, kv_rope, idx, sink, cu_q, cu_k = _attn_problem(c, seed=100 + ci)
        layout = _layout(c["lens"], world, seed=7 * ci + world)
        kw = dict(v=v, d_v=None if c["sep"] else c["Dv"], q_rope=q_rope, kv_rope=kv_rope, block_size=c["block"],
                  cu_seqlens_q=cu_q, causal=c["causal"], attn_sink=sink)
        ref_out, ref_lse = python_ref.selective_attention_dense(q, kv, idx, cu_seqlens_k=cu_k, **kw)
        one_out, one_lse = attention.selective_attention(q, kv, idx, cu_seqlens_k=cu_k, return_lse=True, **kw)
        if c["page"]:
            kv_s, table = _paged(kv, layout, rank, cu_k, c["page"], seed=ci)
            v_s = _paged(v, layout, rank, cu_k, c["page"], seed=ci)[0] if v is not None else None
            kr_s = _paged(kv_rope, layout, rank, cu_k, c["page"], seed=ci)[0] if kv_rope is not None else None
        else:
            kv_s, table = layout.shard(kv, rank, cu_k), None
            v_s = layout.shard(v, rank, cu_k) if v is not None else None
            kr_s = layout.shard(kv_rope, rank, cu_k) if kv_rope is not None else None
        kw.update(v=v_s, kv_rope=kr_s, block_table=table)
        # Both patterns at every world size; "auto" (one of them, by bytes) once.
        for combine in ("all_gather", "reduce_scatter") + (("auto",) if ci == 0 else ()):
            what = f"{c['name']} world={world} rank={rank} combine={combine}"
            out, lse = attention.distributed.selective_attention(q, kv_s, idx, shard=layout, combine=combine,
                                                                 return_lse=True, **kw)
            _check_attn(out, lse, ref_out, ref_lse, c["dtype"], what)
            _check_attn(out, lse, one_out, one_lse, c["dtype"], what + " vs single device")
            assert torch.equal(out[0], torch.zeros_like(out[0])) and bool((lse[0] == float("-inf")).all()), what
        straddled += _straddled(layout, c["block"])
    assert straddled or world == 1, "no block straddles two ranks: the layouts lost their coverage"


# ----------------------------------------------------------------------------- selection scenarios
SEL_CASES = [
    dict(name="contig-causal", lens=[90], lq=[5], Hi=4, Di=16, k=12, block=1, reduce="max", page=0, integer=False),
    dict(name="paged-varlen", lens=[40, 71], lq=[3, 2], Hi=2, Di=8, k=9, block=1, reduce="max", page=8,
         integer=False),
    dict(name="integer-ties", lens=[64, 33], lq=[2, 3], Hi=2, Di=4, k=20, block=1, reduce="max", page=0,
         integer=True),
    dict(name="blocks-max", lens=[77, 50], lq=[3, 2], Hi=2, Di=8, k=6, block=4, reduce="max", page=8,
         integer=False),
    dict(name="blocks-mean", lens=[77], lq=[4], Hi=2, Di=8, k=5, block=8, reduce="mean", page=0, integer=False),
    dict(name="blocks-mean-ties", lens=[70, 45], lq=[2, 2], Hi=2, Di=4, k=7, block=4, reduce="mean", page=0,
         integer=True),
]


def _sel_problem(c, seed):
    g = torch.Generator().manual_seed(seed)
    lens, lq = c["lens"], c["lq"]
    S, T = sum(lens), sum(lq)
    if c["integer"]:  # exact float32 scores with many real ties (across shard boundaries too)
        q = torch.randint(-1, 2, (T, c["Hi"], c["Di"]), generator=g).float()
        kx = torch.randint(-1, 2, (S, c["Di"]), generator=g).float()
        w = torch.randint(1, 3, (T, c["Hi"]), generator=g).float()
        scale = 1.0
    else:
        q = torch.randn(T, c["Hi"], c["Di"], generator=g)
        kx = torch.randn(S, c["Di"], generator=g)
        w = torch.randn(T, c["Hi"], generator=g)
        scale = None
    return q, kx, w, scale, _cu(lq), _cu(lens)


def _scenario_select(rank, world):
    straddled = 0
    for ci, c in enumerate(SEL_CASES):
        q, kx, w, scale, cu_q, cu_k = _sel_problem(c, seed=200 + ci)
        layout = _layout(c["lens"], world, seed=11 * ci + world)
        kw = dict(scale=scale, cu_seqlens_q=cu_q, block_size=c["block"], block_reduce=c["reduce"])
        want = attention.select(q, kx, w, c["k"], cu_seqlens_k=cu_k, **kw)
        if c["page"]:
            k_s, table = _paged(kx, layout, rank, cu_k, c["page"], seed=ci)
        else:
            k_s, table = layout.shard(kx, rank, cu_k), None
        got = attention.distributed.select(q, k_s, w, c["k"], shard=layout, block_table=table, **kw)
        assert torch.equal(got, want), f"{c['name']} world={world} rank={rank}:\n{got}\n{want}"
        if c["integer"]:
            assert (python_ref.select_dense(q, kx, w, c["k"], cu_seqlens_k=cu_k, **kw) == want).all()
        straddled += _straddled(layout, c["block"])
    assert straddled or world == 1, "no block straddles two ranks: the layouts lost their coverage"


# ----------------------------------------------------------------------------- errors on one rank
def _scenario_errors(rank, world):
    """A bad input on the last rank only raises on every rank (no hang); then the group still works."""
    q, kv, v, q_rope, kv_rope, idx, sink, cu_q, cu_k = _attn_problem(ATTN_CASES[0], seed=100)
    layout = ShardLayout.even(61, world)  # every rank holds rows
    kv_s = layout.shard(kv, rank, cu_k)
    kr_s = layout.shard(kv_rope, rank, cu_k)
    bad = rank == world - 1
    kw = dict(d_v=32, q_rope=q_rope, kv_rope=kr_s, cu_seqlens_q=cu_q, causal=True, attn_sink=sink)
    with pytest.raises((ValueError, TypeError)) as ei:
        attention.distributed.selective_attention(q, kv_s.double() if bad else kv_s, idx, shard=layout, **kw)
    assert ("kv_shard must have q's dtype" in str(ei.value)) if bad else ("rejected their inputs" in str(ei.value))
    # A shard shorter than the layout says (the last rank always holds rows here): named on that rank.
    assert kv_s.shape[0] or not bad
    with pytest.raises(ValueError) as ei:
        attention.distributed.selective_attention(q, kv_s[:-1] if bad else kv_s, idx, shard=layout,
                                                  **dict(kw, kv_rope=kr_s[:-1] if bad else kr_s))
    assert ("kv_shard does not hold the rows" in str(ei.value)) if bad else ("rejected" in str(ei.value))
    # Selection: k differs on one rank -> every rank raises (the collectives would not match).
    qi, kx, w, scale, cq, ck = _sel_problem(SEL_CASES[0], seed=200)
    sl = _layout([90], world, seed=world)
    with pytest.raises(ValueError, match="disagree on k" if world > 1 else "never"):
        if world == 1:
            raise ValueError("never")
        attention.distributed.select(qi, sl.shard(kx, rank), w, 5 if bad else 6, shard=sl, cu_seqlens_q=cq)
    # Layout for another world size: raised everywhere before any collective.
    with pytest.raises(ValueError, match="shard must describe the group's"):
        attention.distributed.selective_attention(q, kv_s, idx, shard=ShardLayout.even(61, world + 1), **kw)
    # The group is still healthy: a correct call goes through.
    out = attention.distributed.selective_attention(q, kv_s, idx, shard=layout, **kw)
    ref = python_ref.selective_attention_dense(q, kv, idx, d_v=32, q_rope=q_rope, kv_rope=kv_rope, cu_seqlens_q=cu_q,
                                               causal=True, attn_sink=sink)[0]
    assert (out.double() - ref).abs().max().item() <= 1e-4


def _scenario_all(rank, world):
    _scenario_attention(rank, world)
    _scenario_select(rank, world)
    _scenario_errors(rank, world)


SCENARIOS = {"all": _scenario_all}


@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"world{w}")
def test_context_parallel_gloo(world, tmp_path):
    """Attention (3 layouts x 2 combine patterns), selection (6 cases, exact) and error agreement."""
    run_group(world, "all", tmp_path)


# ----------------------------------------------------------------------------- single-process pieces
def test_shard_layout_rules():
    lay = ShardLayout.even([10, 3], 4)
    assert lay.bounds == ((0, 3, 6, 8, 10), (0, 1, 2, 3, 3)) and lay.world_size == 4 and lay.seqlens == (10, 3)
    assert ShardLayout.from_lengths([2, 0, 5]).bounds == ((0, 2, 2, 7),)
    assert ShardLayout((0, 5, 9, 12)).boundary_blocks(4) == [[1, 2]]
    assert ShardLayout((0, 8, 12)).boundary_blocks(4) == [[]]
    x = torch.arange(13)
    assert torch.equal(lay.shard(x, 1, torch.tensor([0, 10, 13])), torch.tensor([3, 4, 5, 11]))
    with pytest.raises(ValueError, match="non-decreasing"):
        ShardLayout((0, 5, 3))
    with pytest.raises(ValueError, match="start at 0"):
        ShardLayout((1, 5))
    with pytest.raises(ValueError, match=r"bounds\[1\] must have 3 entries"):
        ShardLayout(((0, 1, 2), (0, 3)))
    with pytest.raises(TypeError, match="must hold ints"):
        ShardLayout((0, 1.5, 2))


def test_combine_choice_by_bytes():
    """all_gather's bytes grow with the world size, reduce_scatter's stay ~2x one output: the crossover."""
    T, H, Dv = 1, 128, 512
    assert choose_combine(T, H, Dv, torch.bfloat16, 2) == "all_gather"
    assert choose_combine(T, H, Dv, torch.bfloat16, 3) == "all_gather"  # float32 sums cost 2x a bf16 row
    assert choose_combine(T, H, Dv, torch.float32, 3) == "reduce_scatter"
    assert choose_combine(T, H, Dv, torch.bfloat16, 4) == "reduce_scatter"
    b = combine_bytes(T, H, Dv, torch.bfloat16, 4)
    assert b["all_gather"] == 3 * T * H * (4 + Dv * 2)
    assert combine_bytes(T, H, Dv, torch.float32, 1) == {"all_gather": 0, "reduce_scatter": 0}


def test_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        attention.distributed.selective_attention(torch.zeros(1, 1, 4), torch.zeros(2, 1, 4),
                                                  torch.zeros(1, 1, 1, dtype=torch.int32),
                                                  shard=ShardLayout.even(2, 1))
