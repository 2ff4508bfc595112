"""DeepSeek-shaped benchmark of the ascendc backend against torch_npu.npu_sparse_flash_attention.

Run by bench/npu_check.sh on an Ascend machine (CANN + torch_npu). It has NEVER RUN: its authors had
no NPU. Both kernels get the same inputs; outputs are compared before anything is timed (docs/style.md
rule 9), and the table reports each time and the ratio measured in this one run.

Shapes: MLA absorb form, one kv head, Dqk = 512 + 64 rope, Dv = 512, H query heads, K selected
tokens per query, causal, all indices valid and unique (torch_npu wants valid ones first).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _inputs(T, H, K, S, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 512, generator=g).to(dtype)
    q_rope = torch.randn(T, H, 64, generator=g).to(dtype)
    kv = torch.randn(S, 1, 512, generator=g).to(dtype)
    kv_rope = torch.randn(S, 1, 64, generator=g).to(dtype)
    # query t sits at position S - T + t (bottom-right); choose K distinct positions it may see, sorted
    idx = torch.empty(T, 1, K, dtype=torch.int32)
    for t in range(T):
        visible = S - T + t + 1
        idx[t, 0] = torch.randperm(visible, generator=g)[:K].sort().values.to(torch.int32)
    mv = lambda x: x.to(device)  # noqa: E731
    return dict(q=mv(q), q_rope=mv(q_rope), kv=mv(kv), kv_rope=mv(kv_rope), indices=mv(idx))


def _ours(a, scale):
    import attention

    return attention.selective_attention(a["q"], a["kv"], a["indices"], d_v=512, q_rope=a["q_rope"],
                                         kv_rope=a["kv_rope"], sm_scale=scale, causal=True, backend="ascendc")


def _theirs(a, scale):
    import torch_npu

    T, S = a["q"].shape[0], a["kv"].shape[0]
    out = torch_npu.npu_sparse_flash_attention(
        a["q"], a["kv"], a["kv"], a["indices"], scale,
        actual_seq_lengths_query=torch.tensor([T], dtype=torch.int32, device=a["q"].device),
        actual_seq_lengths_kv=torch.tensor([S], dtype=torch.int32, device=a["q"].device),
        query_rope=a["q_rope"], key_rope=a["kv_rope"], sparse_block_size=1, layout_query="TND", layout_kv="TND",
        sparse_mode=3, attention_mode=2)
    return out[0] if isinstance(out, (tuple, list)) else out


def _time(fn, iters):
    for _ in range(3):
        fn()
    torch.npu.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.npu.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = ap.parse_args(argv)
    import torch_npu  # noqa: F401

    dtype = getattr(torch, args.dtype)
    dev = torch.device("npu")
    scale = 576 ** -0.5
    rows = [("T", "H", "K", "S", "max|ours-torch_npu|", "ours us", "torch_npu us", "ours/torch_npu")]
    shapes = [(1, 128, 2048, 8192), (4, 128, 2048, 8192), (32, 128, 2048, 8192), (128, 64, 2048, 16384),
              (16, 16, 512, 4096)]
    for i, (T, H, K, S) in enumerate(shapes):
        print(f"[{i + 1}/{len(shapes)}] T={T} H={H} K={K} S={S}", file=sys.stderr, flush=True)
        a = _inputs(T, H, K, S, dtype, dev, seed=i)
        ours = _ours(a, scale)
        try:
            theirs = _theirs(a, scale)
            err = float((ours.float() - theirs.float()).abs().max())
            t_theirs = _time(lambda: _theirs(a, scale), args.iters)
        except Exception as e:  # keep our row: the comparison failing is itself a result
            err, t_theirs = float("nan"), float("nan")
            print(f"  torch_npu.npu_sparse_flash_attention failed: {e}", file=sys.stderr)
        # correctness first: against the float64 reference on the CPU, on a few rows
        import python_ref

        cpu = {k: v[:2].cpu() if k in ("q", "q_rope", "indices") else v.cpu() for k, v in a.items()}
        ref = python_ref.selective_attention(cpu["q"].double(), cpu["kv"].double(), cpu["indices"], d_v=512,
                                             q_rope=cpu["q_rope"].double(), kv_rope=cpu["kv_rope"].double(),
                                             sm_scale=scale, causal=True,
                                             cu_seqlens_q=torch.tensor([0, min(T, 2)], dtype=torch.int32),
                                             cu_seqlens_k=torch.tensor([0, S - T + min(T, 2)], dtype=torch.int32))
        ref_err = float((ours[:2].double().cpu() - ref).abs().max())
        if ref_err > 3e-2:
            print(f"  ours differs from the reference by {ref_err:.3g}: not timing it", file=sys.stderr)
            rows.append((str(T), str(H), str(K), str(S), f"{err:.3g}", "WRONG", f"{t_theirs:.1f}", "-"))
            continue
        t_ours = _time(lambda: _ours(a, scale), args.iters)
        rows.append((str(T), str(H), str(K), str(S), f"{err:.3g}", f"{t_ours:.1f}", f"{t_theirs:.1f}",
                     f"{t_ours / t_theirs:.2f}" if t_theirs == t_theirs else "-"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w[i]) for i, c in enumerate(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
