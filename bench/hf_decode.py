"""Decode-step benchmark: DeepSeek-V3.2 in transformers, HF eager attention vs absorb_mla().

    PYTHONPATH=. python bench/hf_decode.py                       # hidden 1024, 16 heads, 4K context, top-k 512
    PYTHONPATH=. python bench/hf_decode.py --kv-lora-rank 512    # DeepSeek's 512 + 64 = 576 latent values

One random model (built in code, nothing downloaded), two copies of its cache: each path prefills the
same prompt (in chunks, so eager's dense [S, T] weights stay small), checks that its next-token logits
agree with the other path (docs/style.md rule 9: correct before timed), then times single-token decode
steps. Reported: the whole model step and the attention modules alone (forward hooks), and the memory
of the cache plus what HF eager materialises per layer per step (per-head K and V of the whole
context, from `expand_kv`), all measured from the tensors themselves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def build(args):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg = DeepseekV32Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.hidden // 2, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank, qk_rope_head_dim=args.rope, qk_nope_head_dim=args.nope,
        v_head_dim=args.v_head, index_topk=args.topk, index_head_dim=args.index_dim,
        index_n_heads=args.index_heads, first_k_dense_replace=args.layers,  # dense MLPs: attention is the subject
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        max_position_embeddings=args.context + args.steps + 16, initializer_range=0.05)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return DeepseekV32ForCausalLM(cfg).eval()


class AttnTimer:
    """Wall time spent inside the attention modules (sum over layers) during one model call."""

    def __init__(self, model):
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention

        self.total = 0.0
        self._t0 = {}
        self.handles = []
        for m in model.modules():
            if isinstance(m, DeepseekV32Attention):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, mod, args):
        self._t0[id(mod)] = time.perf_counter()

    def _post(self, mod, args, out):
        self.total += time.perf_counter() - self._t0.pop(id(mod))

    def remove(self):
        for h in self.handles:
            h.remove()


def prefill(model, ids, chunk, label):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    n = ids.shape[1]
    t0 = time.perf_counter()
    logits = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        logits = model(input_ids=ids[:, s:e], attention_mask=torch.ones(ids.shape[0], e, dtype=torch.long),
                       cache=cache, use_cache=True).logits[:, -1]
        print(f"  {label}: prefill {e}/{n} tokens ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return cache, logits


def decode(model, cache, tokens, context):
    """Time single-token steps; returns (step times, attention times, last logits)."""
    timer = AttnTimer(model)
    steps, attn, logits = [], [], None
    B = tokens.shape[0]
    try:
        for j in range(tokens.shape[1]):
            mask = torch.ones(B, context + j + 1, dtype=torch.long)
            timer.total = 0.0
            t0 = time.perf_counter()
            logits = model(input_ids=tokens[:, j:j + 1], attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
            steps.append(time.perf_counter() - t0)
            attn.append(timer.total)
    finally:
        timer.remove()
    return steps, attn, logits


def cache_bytes(cache):
    """(allocated latent / K-V storage, part of it sequences hold, indexer keys) bytes of an HF cache
    or of our paged layers."""
    main = used = idx = 0
    for layer in cache.layers:
        if hasattr(layer, "memory_bytes"):
            main += layer.memory_bytes()
            used += layer.paged.used_bytes()
        else:
            for t in (layer.keys, layer.values):
                main += t.numel() * t.element_size()
                used += t.numel() * t.element_size()
        if getattr(layer, "indexer_keys", None) is not None:
            idx += layer.indexer_keys.numel() * layer.indexer_keys.element_size()
    return main, used, idx


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-lora-rank", type=int, default=256)
    p.add_argument("--q-lora-rank", type=int, default=512)
    p.add_argument("--rope", type=int, default=64)
    p.add_argument("--nope", type=int, default=128)
    p.add_argument("--v-head", type=int, default=128)
    p.add_argument("--index-heads", type=int, default=16)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--topk", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--backend", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.context), generator=g)
    tokens = torch.randint(0, args.vocab, (args.batch, args.steps), generator=g)
    print(f"config: hidden {args.hidden}, heads {args.heads}, kv_lora_rank {args.kv_lora_rank}, rope {args.rope}, "
          f"nope {args.nope}, v {args.v_head}, layers {args.layers}, batch {args.batch}, context {args.context}, "
          f"top-k {args.topk}, threads {torch.get_num_threads()}", file=sys.stderr)
    results = run_both(model, ids, tokens, args)
    ok = report_correctness(results, args.steps)
    print_table(results, args)
    return 0 if ok else 1


def run_both(model, ids, tokens, args):
    """Prefill and decode with HF eager attention, then with absorb_mla(), on the same model; per path
    the logits after prefill and after the last step, step and attention times, cache bytes, and the
    per-head K/V HF eager materialises per layer-step (measured on the tensors expand_kv returns)."""
    from attention.integrations.transformers import absorb_mla, unabsorb_mla
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Attention

    expanded = {"max": 0}
    orig_expand = DeepseekV32Attention.expand_kv

    def recording_expand(self, kv_nope, k_rot):
        k, v = orig_expand(self, kv_nope, k_rot)
        expanded["max"] = max(expanded["max"], k.numel() * k.element_size() + v.numel() * v.element_size())
        return k, v

    results = {}
    with torch.inference_mode():
        for label in ("hf_eager", "absorb_mla"):
            unabsorb_mla(model)
            if label == "absorb_mla":
                absorb_mla(model, backend=args.backend)
            DeepseekV32Attention.expand_kv = recording_expand
            try:
                cache, first = prefill(model, ids, args.chunk, label)
                expanded["max"] = 0
                steps, attn, last = decode(model, cache, tokens, args.context)
            finally:
                DeepseekV32Attention.expand_kv = orig_expand
            results[label] = dict(first=first, last=last, steps=steps, attn=attn, cache=cache_bytes(cache),
                                  expanded=expanded["max"])
            print(f"  {label}: decode step {statistics.median(steps) * 1e3:.1f} ms", file=sys.stderr)
    unabsorb_mla(model)
    return results


def report_correctness(results, steps: int) -> bool:
    """Do both paths' next-token logits agree (after prefill and after the decode steps)? Printed."""
    e, a = results["hf_eager"], results["absorb_mla"]
    err_first = (e["first"] - a["first"]).abs().max().item()
    err_last = (e["last"] - a["last"]).abs().max().item()
    scale = e["last"].abs().max().item()
    ok = err_first <= 1e-3 * max(1.0, scale) and err_last <= 1e-3 * max(1.0, scale)
    print(f"\ncorrectness: max |logits eager - absorbed| after prefill {err_first:.2e}, after {steps} "
          f"decode steps {err_last:.2e} (|logits| max {scale:.2f}): {'OK' if ok else 'MISMATCH'}")
    return ok


def print_table(results, args) -> None:
    """Times and memory of both paths side by side, with their ratio."""
    e, a = results["hf_eager"], results["absorb_mla"]
    med = {k: (statistics.median(r["steps"]), statistics.median(r["attn"])) for k, r in results.items()}
    per_token_eager = args.heads * (args.nope + args.rope + args.v_head)
    per_token_latent = args.kv_lora_rank + args.rope
    rows = [
        ("decode step, whole model (ms)", med["hf_eager"][0] * 1e3, med["absorb_mla"][0] * 1e3),
        ("decode step, attention modules (ms)", med["hf_eager"][1] * 1e3, med["absorb_mla"][1] * 1e3),
        ("values per token per layer (K,V / latent)", per_token_eager, per_token_latent),
        ("cache storage allocated, all layers (MiB)", e["cache"][0] / 2**20, a["cache"][0] / 2**20),
        ("  of which sequences hold (MiB)", e["cache"][1] / 2**20, a["cache"][1] / 2**20),
        ("per-head K,V materialised per layer-step (MiB)", e["expanded"] / 2**20, a["expanded"] / 2**20),
        ("peak K/V working set: cache + 1 layer's K,V (MiB)",
         (e["cache"][0] + e["expanded"]) / 2**20, (a["cache"][0] + a["expanded"]) / 2**20),
        ("indexer key cache, all layers (MiB, same both)", e["cache"][2] / 2**20, a["cache"][2] / 2**20),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'metric':<{w}}  {'hf_eager':>10}  {'absorb_mla':>10}  {'ratio':>7}")
    for name, x, y in rows:
        ratio = f"{x / y:7.2f}x" if y else "      -"
        print(f"{name:<{w}}  {x:10.2f}  {y:10.2f}  {ratio}")
    print(f"(context {args.context + args.steps} tokens at the last step, median of {args.steps} steps, float32)")


if __name__ == "__main__":
    sys.exit(main())
