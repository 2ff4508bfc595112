"""Named benchmark presets. DeepSeek-V3.2 sparse MLA: H=128 query heads sharing one latent kv head
(Hkv=1), 576-wide rows (512 latent + 64 rope) whose first 512 columns are the value, top-2048
token selection shared by all heads, a paged bfloat16 cache (page 64)."""

from __future__ import annotations

from typing import Dict, List

from .problems import Case, Problem


def dsv32(family: str, **kw) -> Case:
    base = dict(H=128, Hkv=1, Dqk=576, Dv=512, latent=True, K=2048, block_size=1, page_size=64,
                shared_indices=True, dtype="bfloat16")
    base.update(kw)
    return Problem(family, **base)


def nsa(family: str, **kw) -> Case:
    # NSA selected-block branch as fla's parallel_nsa runs it: GQA with 16 query heads per kv head,
    # 64-token blocks, 16 blocks per query chosen per kv head, causal prefill.
    base = dict(H=64, Hkv=4, Dqk=128, Dv=128, latent=False, K=16, block_size=64, page_size=0,
                causal=True, shared_indices=False, dtype="bfloat16")
    base.update(kw)
    return Problem(family, **base)


def dsv32_selection(family: str, T: int, context: int, *, Hi: int = 64, Di: int = 128, k: int = 2048,
                    dtype: str = "bfloat16") -> Case:
    """DeepSeek-V3.2 lightning indexer + top-k over one sequence (queries = its last ``T`` positions),
    causal: a Case of op "select", which reads ``H``, ``Dqk``, ``K`` as the indexer's ``Hi``, ``Di``, ``k``
    (as bench/compile_budget.py's selection problems do)."""
    return Problem(family, batch=1, q_per_seq=T, context=context, H=Hi, Dqk=Di, K=k, page_size=0, causal=True,
                   dtype=dtype, op="select")


PRESETS: Dict[str, List[Case]] = {
    # Seconds on 2 CPU cores: a DeepSeek-shaped (narrow: 16 heads, K=128) paged decode at three
    # context lengths, and a small NSA block-selection prefill.
    "smoke": [dsv32("smoke-mla-decode", batch=1, q_per_seq=1, context=c, H=16, K=128) for c in (256, 512, 1024)]
    + [nsa("smoke-nsa-prefill", batch=1, q_per_seq=512, context=512, H=16, Hkv=1, Dqk=64, Dv=64, K=8,
           block_size=16)],
    # Four sequences decoding one token each against a 32K-token cache: bfloat16, and the quantized
    # caches laid out as FlashMLA's V3.2 record: 512 latent values in fp8 / int8 with a
    # float32 scale per 128, the 64 rope values in bfloat16 (kv_rope), 656 bytes a row against 1152.
    "dsv32-decode": [dsv32("dsv32-decode", batch=4, q_per_seq=1, context=32768)]
    + [dsv32(f"dsv32-decode-{qt}", batch=4, q_per_seq=1, context=32768, Dqk=512, Dr=64, kv_quant=qt)
       for qt in ("fp8", "int8")],
    # One 4096-token causal prefill (every query selects 2048 of the positions before it).
    "dsv32-prefill": [dsv32("dsv32-prefill", batch=1, q_per_seq=4096, context=4096, causal=True)],
    "nsa-prefill": [nsa("nsa-prefill", batch=1, q_per_seq=c, context=c) for c in (4096, 8192)],
    # Decode of one sequence at growing context, selection fixed at 2048 tokens.
    "context-sweep": [dsv32("context-sweep", batch=1, q_per_seq=1, context=c)
                      for c in (4096, 8192, 16384, 32768, 65536, 131072)],
    # Indexer + top-k: 4 decode queries over 32K, and a 128-token causal chunk over 8K.
    "selection": [dsv32_selection("selection-decode", T=4, context=32768),
                  dsv32_selection("selection-prefill", T=128, context=8192)],
}

DEFAULT_PRESET = "smoke"

# Presets that must stay fast (CI, demos) time fewer samples and measure the limits on smaller
# operands; command-line --warmup/--repeats still win.
PRESET_TIMING = {"smoke": dict(warmup=1, repeats=3, quick_limits=True)}
