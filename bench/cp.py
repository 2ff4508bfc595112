"""Context-parallel DeepSeek-V3.2 decode over N processes: ``python -m bench --preset cp-decode``.

Each world size in ``--world`` spawns that many processes (gloo on the CPU here; ``--backend-dist nccl``
under torchrun on GPUs, see docs/distributed.md). Every rank holds a contiguous shard of each
sequence's latent cache (576-wide rows: 512 latent + 64 rope, first 512 = value) and of the
indexer keys. One decode step = ``attention.distributed.select`` (lightning indexer + global top-k)
then ``attention.distributed.selective_attention`` on the selected positions.

Checked before timed: rank 0 compares the distributed indices with ``attention.select`` on the
whole cache (must be equal) and the output with ``attention.selective_attention`` on the whole
cache (SPEC tolerances). Then it reports, per step and per rank:

* communication bytes each rank receives, counted at every collective call (ring algorithms:
  all-gather (W-1)/W of the output, reduce-scatter (W-1)/W of the input, all-reduce 2(W-1)/W);
* the bytes of the alternative, gathering the selected rows to one device: rows selected by all
  of the step's queries that live on other ranks, times the row size (kv + indexer key);
* the step time (median), split into select and attention, next to the one-process time on the
  whole cache (world 1 row).

Ends with a table; ``--out DIR`` also writes ``cp-decode-cpu.json`` there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

from attention.testing import DTYPES_BY_NAME as DTYPES  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench --preset cp-decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cp-decode", choices=["cp-decode"])
    p.add_argument("--world", default="1,2,4", help="comma list of world sizes (default 1,2,4)")
    p.add_argument("--context", type=int, default=32768, help="tokens per sequence (default 32768)")
    p.add_argument("--batch", type=int, default=1, help="sequences, one decode token each (default 1)")
    p.add_argument("--heads", type=int, default=128, help="query heads (DeepSeek-V3.2: 128)")
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--index-heads", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (default 5)")
    p.add_argument("--combine", default="auto", choices=["auto", "all_gather", "reduce_scatter"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--backend-dist", default="gloo", help="torch.distributed backend: gloo (CPU), nccl, hccl")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "npu"],
                   help="tensor device; cuda/npu use device LOCAL_RANK (torchrun) or the rank")
    p.add_argument("--out", default=None, help="directory for cp-decode-cpu.json")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one rank
def _problem(a, device):
    """The whole problem, identical on every rank (one seed)."""
    g = torch.Generator().manual_seed(1234)
    dt = DTYPES[a.dtype]
    B, L = a.batch, a.context
    S = B * L
    p = dict(
        q=torch.randn(B, a.heads, 512, generator=g).to(dt),
        q_rope=torch.randn(B, a.heads, 64, generator=g).to(dt),
        kv=torch.randn(S, 1, 512, generator=g).to(dt),
        kv_rope=torch.randn(S, 1, 64, generator=g).to(dt),
        q_idx=torch.randn(B, a.index_heads, 128, generator=g).to(dt),
        k_idx=torch.randn(S, 128, generator=g).to(dt),
        weights=torch.randn(B, a.index_heads, generator=g),
        cu_q=torch.arange(B + 1, dtype=torch.int32),
        cu_k=torch.arange(B + 1, dtype=torch.int32) * L,
    )
    return {k: v.to(device) for k, v in p.items()}


class _Counter:
    """Bytes this rank receives, counted at each collective attention.distributed issues."""

    def __init__(self, world):
        self.world, self.bytes, self.calls = world, 0, 0

    def wrap(self):
        import torch.distributed as dist

        import attention.distributed as ad

        W = self.world
        ag, rs, ar = ad._all_gather, ad._reduce_scatter, dist.all_reduce

        def all_gather(out, inp, group):
            self.bytes += out.numel() * out.element_size() * (W - 1) // W
            self.calls += 1
            return ag(out, inp, group)

        def reduce_scatter(out, inp, group):
            self.bytes += inp.numel() * inp.element_size() * (W - 1) // W
            self.calls += 1
            return rs(out, inp, group)

        def all_reduce(t, *args, **kw):
            self.bytes += 2 * t.numel() * t.element_size() * (W - 1) // W
            self.calls += 1
            return ar(t, *args, **kw)

        ad._all_gather, ad._reduce_scatter, dist.all_reduce = all_gather, reduce_scatter, all_reduce


def _rank_main(rank, world, a, store, result_path):
    """One rank: spawned here (``store`` = a file store), or started by torchrun (``store`` None: env://)."""
    import torch.distributed as dist

    import attention
    from attention.distributed import ShardLayout

    torch.set_num_threads(a.threads)
    init = "env://" if store is None else f"file://{store}"
    dist.init_process_group(a.backend_dist, init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    if a.device == "cpu":
        dev = torch.device("cpu")
    else:
        dev = torch.device(a.device, int(os.environ.get("LOCAL_RANK", rank)))
        getattr(torch, a.device).set_device(dev)
    p = _problem(a, dev)
    layout = ShardLayout.even([a.context] * a.batch, world)
    kv_s = layout.shard(p["kv"], rank, p["cu_k"])
    kr_s = layout.shard(p["kv_rope"], rank, p["cu_k"])
    ki_s = layout.shard(p["k_idx"], rank, p["cu_k"])
    sink = None

    def step():
        t0 = time.perf_counter()
        idx = attention.distributed.select(p["q_idx"], ki_s, p["weights"], a.topk, shard=layout,
                                           cu_seqlens_q=p["cu_q"])
        t1 = time.perf_counter()
        out = attention.distributed.selective_attention(
            p["q"], kv_s, idx, shard=layout, d_v=512, q_rope=p["q_rope"], kv_rope=kr_s, cu_seqlens_q=p["cu_q"],
            causal=True, attn_sink=sink, combine=a.combine)
        t2 = time.perf_counter()
        return idx, out, t1 - t0, t2 - t1

    idx, out, _, _ = step()  # warm-up, and the result checked below
    check = {}
    if rank == 0:
        want = attention.select(p["q_idx"], p["k_idx"], p["weights"], a.topk, cu_seqlens_q=p["cu_q"],
                                cu_seqlens_k=p["cu_k"])
        ref = attention.selective_attention(p["q"], p["kv"], want, d_v=512, q_rope=p["q_rope"], kv_rope=p["kv_rope"],
                                            cu_seqlens_q=p["cu_q"], cu_seqlens_k=p["cu_k"], causal=True)
        tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[p["q"].dtype]
        check = dict(indices_equal=bool(torch.equal(idx, want)),
                     max_error=float((out.float() - ref.float()).abs().max()), tolerance=tol)
    counter = _Counter(world)
    counter.wrap()
    sel_t, att_t = [], []
    dist.barrier()
    for _ in range(a.steps):
        _, _, ts, ta = step()
        sel_t.append(ts)
        att_t.append(ta)
    comm = counter.bytes // a.steps
    calls = counter.calls // a.steps
    # The alternative: every selected row held elsewhere travels to this rank (kv row + indexer key row).
    row = (512 + 64) * p["kv"].element_size() + 128 * p["k_idx"].element_size()
    starts = torch.tensor(layout.starts(rank))
    ends = starts + torch.tensor(layout.lengths(rank))
    sel = idx.view(a.batch, -1).long().cpu()
    remote = ((sel >= 0) & ((sel < starts[:, None]) | (sel >= ends[:, None]))).sum().item()
    res = dict(rank=rank, world=world, comm_bytes=comm, collectives=calls, gather_rows_bytes=remote * row,
               select_ms=1e3 * statistics.median(sel_t), attention_ms=1e3 * statistics.median(att_t),
               step_ms=1e3 * statistics.median([x + y for x, y in zip(sel_t, att_t)]), **check)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, res)
    dist.destroy_process_group()
    if rank == 0 and result_path is not None:
        with open(result_path, "w") as f:
            json.dump(per_rank, f)
    return per_rank


def _summary(world, per_rank) -> Dict:
    r0 = per_rank[0]
    if not r0["indices_equal"] or not r0["max_error"] <= r0["tolerance"]:
        raise SystemExit(f"cp-decode world {world}: FAILED check {r0}")
    return dict(world=world, comm_bytes=max(r["comm_bytes"] for r in per_rank), collectives=r0["collectives"],
                gather_rows_bytes=r0["gather_rows_bytes"], select_ms=max(r["select_ms"] for r in per_rank),
                attention_ms=max(r["attention_ms"] for r in per_rank), step_ms=max(r["step_ms"] for r in per_rank),
                max_error=r0["max_error"], indices_equal=r0["indices_equal"])


# ----------------------------------------------------------------------------- driver
def run(a) -> List[Dict]:
    import torch.multiprocessing as mp

    rows = []
    for world in [int(w) for w in a.world.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            print(f"cp-decode: world {world} ... ", end="", flush=True, file=sys.stderr)
            t0 = time.monotonic()
            mp.spawn(_rank_main, args=(world, a, os.path.join(d, "store"), os.path.join(d, "res")), nprocs=world)
            per_rank = json.load(open(os.path.join(d, "res")))
            print(f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
        rows.append(_summary(world, per_rank))
    return rows


def table(a, rows) -> str:
    head = (f"cp-decode: DeepSeek-V3.2 decode, batch {a.batch} x 1 token, context {a.context}, H={a.heads}, "
            f"Dqk=576 (512+64), Dv=512, top-{a.topk}, indexer {a.index_heads}x128, {a.dtype}, "
            f"{a.backend_dist}, {a.threads} thread(s)/rank, combine={a.combine}")
    lines = [head, "",
             "| ranks | comm bytes/step/rank | collectives/step | gather selected rows to rank 0 | ratio |"
             " select ms | attention ms | step ms | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['gather_rows_bytes'] / r['comm_bytes']:.1f}x" if r["comm_bytes"] else "-"
        lines.append(f"| {r['world']} | {r['comm_bytes']:,} | {r['collectives']} | {r['gather_rows_bytes']:,} | "
                     f"{ratio} | {r['select_ms']:.1f} | {r['attention_ms']:.1f} | {r['step_ms']:.1f} | "
                     f"indices equal, max err {r['max_error']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        a.world = str(world)
        per_rank = _rank_main(rank, world, a, None, None)
        if rank != 0:
            return 0
        rows = [_summary(world, per_rank)]
    else:
        rows = run(a)
    print(table(a, rows))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "cp-decode-cpu.json"), "w") as f:
            json.dump(dict(args=vars(a), rows=rows, torch=torch.__version__), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
