"""How the AscendC kernel spreads DeepSeek-V3.2 work over the cores, measured on the CPU twin.

For each SoC and problem the twin runs the real kernel once and reports: the candidate splits per
(token, kv head), the blocks launched and the blocks that did work (cube cores busy, out of the SoC's AIC
count), the bytes the cores' MTE2 read from the kernel's inputs in GM (kv rows, q) and from the workspace
hand-over, and the compulsory bytes: every distinct kept kv row of a (token, kv head) read once, plus q
once. The ratio input/compulsory is the redundancy of the gather; the kv-row ratio leaves q out (q is
read once per split that computes its heads: docs/ascendc.md explains why the total cannot reach 1.2x at
T = 1..4 with >= 20 busy cores). With more than one split, the combine launch (vector cores only) reads
the partial results back: its busy vector cores and MTE2 bytes are the last columns.

dsv32-decode: 4 sequences of 32768 cached tokens, one query each (T = 1..4 shown), H = 128, Hkv = 1,
576-wide latent rows (Dv = 512), top-2048 shared indices, paged bfloat16 cache (page 64).
dsv32-prefill: the same rows and selection, causal, over one 4096-token sequence; the twin runs a slice of
its last queries (the per-token figures are those of the full prefill, whose 4096 tokens would take the
CPU twin hours).

A second table puts the kv-row bytes of an int8 cache (576 int8 values + 5 float32 tile scales
per row, dequantized on the vector cores) next to the same decode with the 16-bit cache.

Nothing here ran on an NPU: these are counts of what the kernel asks the hardware to do, not timings.

    PYTHONPATH=. python -m bench.ascend_work [--socs Ascend910B2,...] [--decode-tokens 1,2,4] [--prefill-tokens 8]
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch

from attention.backends import ascendc
from attention.testing import TOLERANCES, max_error, oracle

H, HKV, DQK, DV, K, PAGE = 128, 1, 576, 512, 2048, 64


def _problem(T: int, context: int, seqs: int, causal: bool, dtype: torch.dtype, seed: int = 0) -> Dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = -(-context // PAGE)
    P = pages_per_seq * seqs
    kv = torch.randn(P, PAGE, HKV, DQK, generator=g).to(dtype)
    table = torch.randperm(P, generator=g).to(torch.int32).view(seqs, pages_per_seq)
    q_per_seq = T // seqs
    q = torch.randn(T, H, DQK, generator=g).to(dtype)
    idx = torch.empty(T, 1, K, dtype=torch.int32)
    for t in range(T):
        q_pos = context - q_per_seq + t % q_per_seq  # bottom-right aligned
        visible = q_pos + 1 if causal else context
        idx[t, 0] = torch.randperm(visible, generator=g)[:K].to(torch.int32) if visible >= K else torch.cat(
            [torch.randperm(visible, generator=g).to(torch.int32), torch.full((K - visible,), -1, dtype=torch.int32)])
    cu_q = torch.arange(0, T + 1, q_per_seq, dtype=torch.int32)
    return dict(q=q, kv=kv, indices=idx, d_v=DV, block_table=table, seqlens_k=torch.full((seqs,), context, dtype=torch.int32),
                cu_seqlens_q=cu_q, causal=causal)


def _compulsory_row_bytes(args: Dict[str, object]) -> int:
    """Each distinct kept kv row of a (token, kv head) once."""
    idx = args["indices"]
    elt = args["q"].element_size()
    rows = sum(int(torch.unique(idx[t, 0][idx[t, 0] >= 0]).numel()) for t in range(idx.shape[0]))  # all < L here
    return rows * HKV * DQK * elt


def _compulsory_bytes(args: Dict[str, object]) -> int:
    """Each distinct kept row of a (token, kv head) once, plus q once."""
    return _compulsory_row_bytes(args) + args["q"].numel() * args["q"].element_size()


def measure(soc: str, args: Dict[str, object]) -> Dict[str, object]:
    import attention

    inp = attention.validate(**args)
    out, lse = ascendc.BACKEND.new_outputs(inp)
    rep = ascendc._twin.forward(**ascendc.AscendCBackend._args(inp), out=out, lse=lse, soc=soc)
    # counts of a wrong result mean nothing: check against the float64 oracle first (docs/spec.md section 4)
    want_out, want_lse = oracle(args)
    tol_out, tol_lse = TOLERANCES[inp.dtype]
    err_out, err_lse = max_error(out, want_out), max_error(lse, want_lse)
    if err_out > tol_out or err_lse > tol_lse:
        raise RuntimeError(f"{soc} T={inp.num_tokens}: the twin's result is wrong (max |out - ref| = {err_out:.3g}, "
                           f"max |lse - ref| = {err_lse:.3g})")
    info = next(s for s in ascendc.soc_table() if s["name"] == soc)
    ins, ws = rep["twin_mte2_input_bytes"], rep["twin_mte2_workspace_bytes"]
    comp = _compulsory_bytes(args)
    # kv rows apart from q: a split of the candidates over cores must replicate q, never the rows
    row_bytes = sum(ins) - sum(rep["twin_mte2_query_bytes"])
    comp_rows = _compulsory_row_bytes(args)
    comb = rep["twin_combine_mte2_workspace_bytes"]
    return dict(soc=soc, T=inp.num_tokens, aic=info["aic"], aiv=info["aiv"], blocks=rep["blockDim"],
                busy=sum(1 for b in ins if b > 0), items=rep["numItems"], mTile=rep["mTile"], nTile=rep["nTile"],
                splits=rep["numSplits"], input_bytes=sum(ins), workspace_bytes=sum(ws), compulsory=comp,
                ratio=sum(ins) / comp, max_core_input=max(ins), row_bytes=row_bytes, compulsory_rows=comp_rows,
                row_ratio=row_bytes / comp_rows, query_bytes=sum(rep["twin_mte2_query_bytes"]),
                combine_busy=sum(1 for b in comb if b > 0), combine_bytes=sum(comb))


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socs", default=",".join(ascendc.TEST_SOCS))
    ap.add_argument("--decode-tokens", default="1,2,4")
    ap.add_argument("--prefill-tokens", type=int, default=8)
    a = ap.parse_args(argv)
    if ascendc._twin is None:
        ap.error(str(ascendc._TWIN_ERROR))
    socs = [s for s in a.socs.split(",") if s]
    known = {s["name"]: s for s in ascendc.soc_table()}
    for s in socs:
        if s not in known:
            ap.error(f"unknown SoC {s!r} (known: {', '.join(known)})")
    try:
        decode_t = [int(x) for x in a.decode_tokens.split(",") if x]
    except ValueError:
        ap.error("--decode-tokens takes integers, e.g. 1,2,4")
    if any(t < 1 or t > 4 for t in decode_t) or a.prefill_tokens < 1:
        ap.error("decode tokens must be in 1..4 (one per sequence) and --prefill-tokens >= 1")

    rows = []
    for soc in socs:
        dtype = torch.bfloat16 if known[soc]["bf16"] else torch.float16
        for t in decode_t:
            args = _problem(T=t, context=32768, seqs=t, causal=False, dtype=dtype)
            rows.append(("dsv32-decode", measure(soc, args)))
            print(f"  {soc} dsv32-decode T={t} done", file=sys.stderr, flush=True)
        args = _problem(T=a.prefill_tokens, context=4096, seqs=1, causal=True, dtype=dtype)
        rows.append((f"dsv32-prefill (last {a.prefill_tokens} of 4096 queries)", measure(soc, args)))
        print(f"  {soc} dsv32-prefill done", file=sys.stderr, flush=True)

    print("| problem | SoC | T | splits | work items | cube cores busy / AIC | mTile x nTile | "
          "MTE2 input MiB | of which q MiB | compulsory MiB | input / compulsory | kv rows / compulsory rows | "
          "MTE2 workspace MiB | combine: vector cores busy / AIV | combine MTE2 MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    mib = 1024 * 1024
    for name, r in rows:
        print(f"| {name} | {r['soc']} | {r['T']} | {r['splits']} | {r['items']} | {r['busy']} / {r['aic']} | "
              f"{r['mTile']} x {r['nTile']} | {r['input_bytes'] / mib:.2f} | {r['query_bytes'] / mib:.2f} | "
              f"{r['compulsory'] / mib:.2f} | {r['ratio']:.2f}x | {r['row_ratio']:.2f}x | "
              f"{r['workspace_bytes'] / mib:.2f} | {r['combine_busy']} / {r['aiv']} | {r['combine_bytes'] / mib:.2f} |")

    # int8 cache: the same decode with the cache quantized per row and tile of 128 columns
    from attention import quantize_kv

    print("\n| problem | SoC | T | kv-row MiB, 16-bit cache | kv-row MiB, int8 cache | int8 / 16-bit |")
    print("|---|---|---|---|---|---|")
    for soc in socs:
        dtype = torch.bfloat16 if known[soc]["bf16"] else torch.float16
        args = _problem(T=1, context=32768, seqs=1, causal=False, dtype=dtype)
        plain = measure(soc, args)
        args["kv"], args["kv_scale"] = quantize_kv(args["kv"].float(), torch.int8)
        quant = measure(soc, args)
        print(f"| dsv32-decode | {soc} | 1 | {plain['row_bytes'] / mib:.2f} ({str(dtype)[6:]}) | "
              f"{quant['row_bytes'] / mib:.2f} | {quant['row_bytes'] / plain['row_bytes']:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
