"""Host side of the Triton forward: pick a config, size the grid, launch. Never reads device data.

Everything here is computed from shapes, dtypes and the device's name/properties, so a call issues
only kernel launches (and output allocations): no ``.item()``, no ``.cpu()``, no loop over
sequences. That is what makes the op capturable in a CUDA graph and free of sync points.

Config resolution (see attention/tuning/__init__.py): an exact shape-bucket hit in the tuned-config
store wins; otherwise the store's per-device default. With ``ATTENTION_TRITON_AUTOTUNE=1`` a GPU
call without a tuned entry goes to ``triton.autotune`` over :func:`autotune_configs` (keyed on the
shape constants, pruned by the device's shared memory) instead. Under the interpreter (CPU tensors) the store's CPU entry is
always used: benchmarking configs there would be meaningless and slow.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Dict, Optional, Tuple

import torch
import triton

from ... import tuning
from ...inputs import dtype_name, env_value, new_outputs, next_power_of_2
from . import limits
from .jit_common import LOG2E
from .kernels import (selective_attention_combine_kernel, selective_attention_fwd_kernel,
                      selective_attention_latent_kernel)

BACKEND_NAME = "triton"
# Bump when the kernel's meaning of a config changes: tuned entries of another version are ignored.
KERNEL_VERSION = "fwd-2"

MAX_SPLITS = 64
# The latent kernel keeps the whole value width in one accumulator (no value split) up to this width,
# and the key columns past d_v (DeepSeek's 64 rope columns) in one tile up to MAX_LATENT_TAIL.
MAX_LATENT_DV = 512
MAX_LATENT_TAIL = 256
# Indices the latent kernel's first pass (where its kept candidates end) reads per step: a few
# steps for DeepSeek's 2048 candidates, each a vector of 4 per thread at 8 warps.
KEPT_CHUNK = 1024

# ATTENTION_TRITON_TARGET="NVIDIA H200": plan for that device (its tuned/shipped config and SM count)
# whatever the tensors' device, e.g. on CPU tensors under the interpreter, so that bench.work can
# count the work of the GPU plan. SM counts by substring of the device name (as the tuning store
# matches names); measured with torch.cuda.get_device_properties on those parts.
TARGET_ENV = "ATTENTION_TRITON_TARGET"
# Ascend SoCs (triton-ascend, docs/ascendc.md "Two Ascend paths"): a program runs on one AI core (a cube
# core with its two vector cores for the mixed attention kernels), so the count is the AIC count of
# CANN's platform files (docs/ascendc.md, SoC table); compile-checked only, never run.
SM_COUNTS = (("H200", 132), ("H100", 132), ("H800", 132), ("H20", 78), ("A100", 108), ("A800", 108),
             ("L40S", 142), ("L40", 142), ("RTX 4090", 128),
             ("Ascend910B1", 24), ("Ascend910B2", 24), ("Ascend910B3", 20), ("Ascend910B4", 20),
             ("Ascend910_9391", 24), ("Ascend910_9362", 20))


_p2 = next_power_of_2


def target_name() -> Optional[str]:
    return os.environ.get(TARGET_ENV) or None


def device_name(device: torch.device) -> str:
    if target_name():
        return target_name()
    if device.type == "cpu":
        return tuning.CPU_DEVICE
    if device.type == "npu":  # triton-ascend with torch_npu (backend.py offers npu only then)
        return _npu_name(device.index if device.index is not None else torch.npu.current_device())
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _npu_name(index: int) -> str:
    return torch.npu.get_device_name(index)  # e.g. "Ascend910B2": the tuning store's match key


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> Optional[int]:
    """SMs of the device the plan is for: the target's (ATTENTION_TRITON_TARGET), the GPU's, or None
    (CPU tensors without a target: the interpreter has no SMs to fill)."""
    name = target_name() or (device_name(device) if device.type == "npu" else None)
    if name:
        for key, n in SM_COUNTS:
            if key in name:
                return n
        if device.type == "npu" and not target_name():
            return None  # an Ascend part this table does not know: no split by core count
        raise ValueError(f"{TARGET_ENV}={name!r}: unknown device; known: {[k for k, _ in SM_COUNTS]}")
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return None


@functools.lru_cache(maxsize=None)
def _max_shared_mem(index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        return int(props["max_shared_mem"])
    except Exception:  # older/other drivers: a conservative Ampere-class figure
        return 163 * 1024


def shape_bucket(inp) -> str:
    """Store key of a call's shape: exact widths and group size, power-of-two candidate count,
    and decode (few query tokens, where split-K matters) versus prefill. A decode bucket also holds
    the power-of-two number of query tokens: the split count that fills the GPU for 64 x 1 tokens
    starves it for 4 x 1 (choose_splits)."""
    hg = inp.num_heads // inp.num_kv_heads
    n = inp.topk * inp.block_size
    phase = (f"decode-t{_p2(max(inp.num_tokens, 1))}" if inp.num_tokens * inp.num_kv_heads <= 128 else "prefill")
    dt = dtype_name(inp.dtype)
    # A quantized cache compiles another kernel with other register needs: its own bucket, so a config
    # tuned on a bfloat16 cache is not applied to it (and the reverse).
    quant = "".join(f"-{name}{dtype_name(x.dtype)}" for name, x, s in
                    (("kv", inp.kv, inp.kv_scale), ("v", inp.v, inp.v_scale)) if s is not None)
    return (f"hg{_p2(hg)}-dqk{inp.head_dim}-dv{inp.d_v}-dr{inp.rope_dim}-n{_p2(max(n, 1))}-"
            f"{'paged' if inp.paged else 'contig'}-{phase}-{dt}{quant}")


def autotune_configs():
    """The search space shared by triton.autotune and ``python -m attention.tune``."""
    out = []
    for bn in (32, 64):
        for bd in (64, 128):
            for warps in (4, 8):
                for stages in (1, 2):
                    out.append(dict(BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages))
    return out


def smem_estimate(cfg: Dict, block_h: int, block_dv: int, elem: int) -> int:
    """Bytes of shared memory a config needs: pipelined q/key chunks, the value tile, scores."""
    bn, bd, stages = cfg["BLOCK_N"], cfg["BLOCK_D"], max(1, cfg.get("num_stages", 1))
    return stages * (bn * bd + block_h * bd) * elem + bn * block_dv * elem + block_h * bn * 4


def _prune(configs, named_args, **kwargs):
    """early_config_prune for triton.autotune: drop configs that do not fit the device's smem."""
    q = named_args["Q"] if "Q" in named_args else kwargs["Q"]  # launched by keyword: Q is in kwargs
    limit = _max_shared_mem(q.device.index or 0)
    bh, bdv = kwargs.get("BLOCK_H", named_args.get("BLOCK_H", 64)), kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV", 512))
    elem = q.element_size()
    kept = []
    for c in configs:
        d = dict(c.kwargs, num_stages=c.num_stages)
        if smem_estimate(d, bh, bdv, elem) <= limit:
            kept.append(c)
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def _autotuned_kernel():
    configs = [triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_D": c["BLOCK_D"]}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in autotune_configs()]
    return triton.autotune(
        configs=configs,
        key=["HG", "DQK", "DV", "DR", "BLOCK_SIZE", "PAGED", "SPLIT", "BLOCK_H", "BLOCK_DV", "F32_DOT"],
        prune_configs_by={"early_config_prune": _prune},
    )(selective_attention_fwd_kernel)


def resolve_config(inp, override: Optional[Dict] = None) -> Tuple[Dict, str]:
    """(config, where it came from). ``override`` keys replace the resolved ones (tests, tune)."""
    found = tuning.lookup(BACKEND_NAME, device_name(inp.device), KERNEL_VERSION, shape_bucket(inp))
    cfg, source = found if found is not None else (dict(tuning.FALLBACK_CONFIG), "built-in fallback")
    cfg = dict(tuning.FALLBACK_CONFIG, **cfg)
    if override:
        # An override names one candidate tile for whichever kernel runs (tests, the tune CLI): a
        # BLOCK_N drops the latent tiles it does not name, a LATENT_BLOCK_N the quantized one.
        if "BLOCK_N" in override and "LATENT_BLOCK_N" not in override:
            cfg.pop("LATENT_BLOCK_N", None)
        if ("BLOCK_N" in override or "LATENT_BLOCK_N" in override) and "QUANT_LATENT_BLOCK_N" not in override:
            cfg.pop("QUANT_LATENT_BLOCK_N", None)
        cfg.update(override)
        source = "override"
    return cfg, source


def use_latent_kernel(inp, cfg: Dict) -> bool:
    """Latent mode with d_v <= 512 and a short key tail runs the latent kernel (one gather per tile,
    k_nope reused as the value); separate-V mode and wider shapes run the general kernel.
    ``LATENT: 0`` in a config forces the general kernel (tests, comparisons)."""
    return (inp.v is None and _p2(inp.d_v) <= MAX_LATENT_DV and inp.head_dim - inp.d_v <= MAX_LATENT_TAIL
            and bool(int(cfg.get("LATENT", 1))))


def candidate_tile(inp, cfg: Dict, latent: bool) -> int:
    """The config's candidate tile for the kernel that runs: BLOCK_N (general kernel), else
    LATENT_BLOCK_N where given, and over a quantized cache QUANT_LATENT_BLOCK_N where given (its
    dequantized tile needs registers beside the latent kernel's accumulator: docs/triton.md)."""
    if not latent:
        return cfg["BLOCK_N"]
    if inp.kv_quantized and "QUANT_LATENT_BLOCK_N" in cfg:
        return cfg["QUANT_LATENT_BLOCK_N"]
    return cfg.get("LATENT_BLOCK_N", cfg["BLOCK_N"])


def choose_splits(programs: int, n: int, bn: int, sms: Optional[int], cfg: Dict) -> int:
    """Split count of the candidate list (flash decoding) when the grid alone would leave SMs idle.

    Each split must keep at least ``min_per_split`` candidates (the combine and the partial
    buffers cost about one tile each). Among the allowed counts, the one whose grid best fills
    whole waves of ``sms`` programs wins (fewest splits on a tie): 128 programs on 132 SMs need no
    split; 4 programs get 32 splits (128 programs), not 66 with a half-empty second wave."""
    target = int(cfg.get("target_programs", 0)) or sms or 1
    min_per_split = max(bn, int(cfg.get("min_per_split", 256)))
    if not programs or programs >= target or n < 2 * min_per_split:
        return 1
    most = max(1, min(MAX_SPLITS, n // min_per_split))
    best, best_fill = 1, -1.0
    for s in range(1, most + 1):
        total = programs * s
        fill = total / (math.ceil(total / target) * target)  # busy fraction of the waves it occupies
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def plan(inp, cfg: Dict) -> Dict:
    """Which kernel, block sizes clamped to the shape (power-of-two, >= 16 for tl.dot), the split count."""
    T, H, Hkv = inp.num_tokens, inp.num_heads, inp.num_kv_heads
    hg = H // Hkv
    n = inp.topk * inp.block_size
    latent = use_latent_kernel(inp, cfg)
    bh = max(16, min(_p2(cfg["BLOCK_H"]), _p2(hg)))  # tl.dot needs M >= 16: small groups pad to 16
    bn = max(16, _p2(candidate_tile(inp, cfg, latent)))
    bd = max(16, min(_p2(cfg["BLOCK_D"]), _p2(inp.head_dim)))
    # The rope chunk has its own size where a config gives one (BLOCK_DR: Ascend's UB holds a 64-wide
    # rope chunk of the general kernel only at small tiles); else it follows BLOCK_D.
    bdr = max(16, min(_p2(cfg.get("BLOCK_DR", cfg["BLOCK_D"])), _p2(inp.rope_dim))) if inp.rope_dim else 16
    if latent:  # the whole value width and the whole tail in one tile each: no value split
        bdv = max(16, _p2(inp.d_v))
        bdr = max(16, _p2(inp.rope_dim)) if inp.rope_dim else 16
    else:
        bdv = max(16, min(_p2(cfg["BLOCK_DV"]), _p2(inp.d_v)))
    bdt = max(16, _p2(inp.head_dim - inp.d_v)) if latent and inp.head_dim > inp.d_v else 16
    # Grid axis 1 holds at most 65535 programs (and a launch on npu as many in all): widen head/value
    # blocks for extreme head counts.
    cap = limits.max_programs(inp.device.type)
    max_y = min(limits.MAX_GRID_Y, cap or limits.MAX_GRID_Y)
    while Hkv * triton.cdiv(hg, bh) * triton.cdiv(inp.d_v, bdv) > max_y and (bh < 128 or bdv < 512):
        if bh < min(128, _p2(hg)):
            bh *= 2
        elif bdv < min(512, _p2(inp.d_v)):
            bdv *= 2
        else:
            break
    num_hb, num_dvb = triton.cdiv(hg, bh), triton.cdiv(inp.d_v, bdv)
    programs = T * Hkv * num_hb * num_dvb
    splits = int(cfg.get("num_splits", 0))
    if splits <= 0:
        splits = choose_splits(programs, n, bn, sm_count(inp.device), cfg)
    splits = max(1, min(splits, MAX_SPLITS, max(1, math.ceil(n / bn))))
    if cap is not None:  # one token's programs (all its splits) must fit one launch: token_chunks
        splits = max(1, min(splits, cap // (Hkv * num_hb * num_dvb)))
    per_split = math.ceil(max(n, 1) / splits / bn) * bn
    splits = max(1, math.ceil(n / per_split)) if n else 1
    return dict(kernel="latent" if latent else "general", BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DR=bdr,
                BLOCK_DV=bdv, BLOCK_DT=bdt, NUM_HB=num_hb, NUM_DVB=num_dvb, num_splits=splits,
                cand_per_split=per_split, num_warps=int(cfg.get("num_warps", 4)),
                num_stages=int(cfg.get("num_stages", 1)), GATHER_ROWS=bool(cfg.get("GATHER_ROWS", 0)),
                KEPT_CHUNK=int(cfg.get("KEPT_CHUNK", KEPT_CHUNK)))


def token_chunks(T: int, per_token: int, device: torch.device):
    """[(t_start, tokens)] launches of a grid (T, ...) with ``per_token`` programs per token, each within
    the device's program limit (limits.max_programs; one launch where there is none). Chunks are
    multiples of 16 tokens, so every t_start gets the same integer specialization (one compile)."""
    cap = limits.max_programs(device.type)
    n = T if cap is None else max(1, cap // max(per_token, 1))
    if n < T and n >= 16:
        n -= n % 16
    return [(t0, min(n, T - t0)) for t0 in range(0, T, n)]


def padded_strides(x: Optional[torch.Tensor], paged: bool, n: int):
    """Strides of ``x`` as the kernels take them: a kv-like tensor's (page, row, head, dim), with page
    stride 0 when the cache is contiguous (``n`` = 4); any other tensor's own; ``n`` zeros for an
    absent one. Shared by the forward and backward launchers."""
    if x is None:
        return (0,) * n
    if n == 4:
        return tuple(x.stride()) if paged else (0,) + tuple(x.stride())
    return tuple(x.stride())


def named_strides(prefix: str, axes: str, strides) -> Dict[str, int]:
    """{prefix + axis: stride}: the kernels name their strides stride_<tensor><axis>."""
    return {prefix + a: int(x) for a, x in zip(axes, strides)}


def _kernel_args(inp, p: Dict, out, lse, opart, lpart) -> Dict:
    """The arguments both forward kernels take, by their parameter names (the general kernel adds its
    value tensor's): tensors (absent ones replaced by q, never read), sizes, strides, shape constants."""
    q, kv, idx = inp.q, inp.kv, inp.indices
    T, H, B = inp.num_tokens, inp.num_heads, inp.num_seqs
    paged, split = inp.paged, p["num_splits"] > 1
    on_cpu = inp.device.type == "cpu"
    opt = lambda x: q if x is None else x  # noqa: E731
    # The kernels index these small per-sequence / per-head tensors as dense vectors (a strided or
    # expanded view, e.g. cu_seqlens[::2] or seqlens_k.expand(B), would be read wrongly or out of
    # bounds): one tiny device copy when not contiguous, no sync.
    cuq, cuk, seqk, sink = (None if x is None else x.contiguous()
                            for x in (inp.cu_seqlens_q, inp.cu_seqlens_k, inp.seqlens_k, inp.attn_sink))
    bt = inp.block_table
    # A quantized kv (float8_e4m3fn / int8) comes with float32 tile scales of its leading shape
    # (docs/contract.md "Quantized caches"); the kernels dequantize each gathered tile. The scale block
    # is a compile-time constant only where something is quantized, so unquantized calls share one
    # compile whatever it is.
    ks = inp.kv_scale
    quantized = ks is not None or inp.v_scale is not None
    return dict(
        Q=q, KV=kv, QR=opt(inp.q_rope), KVR=opt(inp.kv_rope), IDX=idx, SINK=opt(sink), BT=opt(bt), CUQ=opt(cuq),
        CUK=opt(cuk), SEQK=opt(seqk), OUT=out, LSE=lse, OPART=opart, LPART=lpart, KS=opt(ks),
        sm_scale_log2=float(inp.sm_scale) * LOG2E, T=T, B=B, S_total=0 if paged else kv.shape[0],
        num_pages=kv.shape[0] if paged else 0, max_pages=bt.shape[1] if bt is not None else 0,
        n_cand=inp.topk * inp.block_size, cand_per_split=p["cand_per_split"],
        n_kscales=ks.shape[-1] if ks is not None else 0,
        **named_strides("stride_q", "thd", q.stride()),
        **named_strides("stride_k", "prhd", padded_strides(kv, paged, 4)),
        **named_strides("stride_ks", "prhd", padded_strides(ks, paged, 4)),
        **named_strides("stride_qr", "thd", padded_strides(inp.q_rope, paged, 3)),
        **named_strides("stride_kr", "prhd", padded_strides(inp.kv_rope, paged, 4)),
        stride_it=idx.stride(0), stride_ig=0 if idx.shape[1] == 1 else idx.stride(1), stride_ik=idx.stride(2),
        **named_strides("stride_bt", "bp", bt.stride() if bt is not None else (0, 0)),
        **named_strides("stride_o", "thd", out.stride()), **named_strides("stride_l", "th", lse.stride()),
        **named_strides("stride_op", "sthd", opart.stride() if split else (0, 0, 0, 0)),
        **named_strides("stride_lp", "sth", lpart.stride() if split else (0, 0, 0)),
        HG=H // inp.num_kv_heads, DQK=inp.head_dim, DV=inp.d_v, DR=inp.rope_dim, BLOCK_SIZE=inp.block_size,
        PAGE_SIZE=inp.page_size if paged else 1, VARLEN=inp.cu_seqlens_q is not None,
        HAS_CUK=inp.cu_seqlens_k is not None, PAGED=paged, CAUSAL=inp.causal, HAS_SINK=inp.attn_sink is not None,
        SPLIT=split, SEARCH_STEPS=max(1, B.bit_length() + 1),
        F32_DOT=on_cpu or inp.dtype == torch.float32,
        # The interpreter truncates float32 -> bfloat16; the kernels then round by hand, as a GPU does.
        RTNE_BF16=on_cpu and inp.dtype == torch.bfloat16,
        NUM_HB=p["NUM_HB"], BLOCK_H=p["BLOCK_H"], BLOCK_DV=p["BLOCK_DV"], BLOCK_DR=p["BLOCK_DR"],
        KV_QUANT=ks is not None, SCALE_BLOCK=inp.scale_block if quantized else 1,
    )


def _general_value_args(inp, p: Dict) -> Dict:
    """What the general kernel takes beyond _kernel_args: its value tensor (latent mode: kv, whose
    first d_v columns are the values) with its scales, and its value blocks and key gather."""
    v = inp.kv if inp.v is None else inp.v
    vs = inp.kv_scale if inp.v is None else inp.v_scale  # latent: the values are kv's columns, kv's scales
    return dict(V=v, **named_strides("stride_v", "prhd", padded_strides(v, inp.paged, 4)), NUM_DVB=p["NUM_DVB"],
                GATHER_ROWS=p["GATHER_ROWS"], VS=vs if vs is not None else inp.q,
                n_vscales=vs.shape[-1] if vs is not None else 0,
                **named_strides("stride_vs", "prhd", padded_strides(vs, inp.paged, 4)), V_QUANT=vs is not None)


def _combine(inp, args: Dict, num_splits: int) -> None:
    """Merge the splits' partial states (args' OPART / LPART) into out and lse."""
    T, H = inp.num_tokens, inp.num_heads
    opart, lpart, out, lse = args["OPART"], args["LPART"], args["OUT"], args["LSE"]
    # Under the interpreter one program per token (fewer interpreted programs); on a GPU small
    # tiles, many programs.
    on_cpu = inp.device.type == "cpu"
    bh = _p2(H) if on_cpu else min(16, _p2(H))
    bdv = _p2(inp.d_v) if on_cpu else min(_p2(inp.d_v), 128)
    cy, cz = triton.cdiv(H, bh), triton.cdiv(inp.d_v, bdv)
    for t_start, tokens in token_chunks(T, cy * cz, inp.device):
        selective_attention_combine_kernel[(tokens, cy, cz)](
            OPART=opart, LPART=lpart, SINK=args["SINK"], OUT=out, LSE=lse, H=H, num_splits=num_splits,
            t_start=t_start, **named_strides("stride_op", "sthd", opart.stride()),
            **named_strides("stride_lp", "sth", lpart.stride()), **named_strides("stride_o", "thd", out.stride()),
            **named_strides("stride_l", "th", lse.stride()), DV=inp.d_v, HAS_SINK=inp.attn_sink is not None,
            BLOCK_H=bh, BLOCK_DV=bdv, RTNE_BF16=args["RTNE_BF16"],
        )


def forward(inp, override: Optional[Dict] = None, autotune: Optional[bool] = None):
    """Run the kernels; returns (out [T, H, Dv] q.dtype, lse [T, H] float32)."""
    out, lse = new_outputs(inp)
    T, H = inp.num_tokens, inp.num_heads
    if T == 0:
        return out, lse
    cfg, source = resolve_config(inp, override)
    p = plan(inp, cfg)
    if autotune is None:
        # Opt-in: autotuning benchmarks on the first call of every shape key (seconds of compiles,
        # and syncs that would break a CUDA-graph capture); tuned store entries are the normal path.
        autotune = (inp.device.type != "cpu" and source != "tuned"
                    and env_value("ATTENTION_TRITON_AUTOTUNE") not in ("0", ""))
    split = p["num_splits"] > 1
    if split:  # each split's normalised partial output and base-2 LSE, in float32
        opart = torch.empty((p["num_splits"], T, H, inp.d_v), device=inp.device, dtype=torch.float32)
        lpart = torch.empty((p["num_splits"], T, H), device=inp.device, dtype=torch.float32)
    else:
        opart, lpart = inp.q, inp.q  # not read
    args = _kernel_args(inp, p, out, lse, opart, lpart)
    if p["kernel"] != "latent":
        args.update(_general_value_args(inp, p))
    y = inp.num_kv_heads * p["NUM_HB"] * p["NUM_DVB"]
    for t_start, tokens in token_chunks(T, y * p["num_splits"], inp.device):
        grid = (tokens, y, p["num_splits"])
        if p["kernel"] == "latent":
            # The loop's own pipelining (tl.range num_stages) is the ring of candidate tiles.
            selective_attention_latent_kernel[grid](**args, t_start=t_start, BLOCK_N=p["BLOCK_N"],
                                                    BLOCK_DT=p["BLOCK_DT"], NUM_STAGES=p["num_stages"],
                                                    KEPT_CHUNK=p["KEPT_CHUNK"], num_warps=p["num_warps"])
        elif autotune:
            _autotuned_kernel()[grid](**args, t_start=t_start)
        else:
            selective_attention_fwd_kernel[grid](**args, t_start=t_start, BLOCK_N=p["BLOCK_N"],
                                                 BLOCK_D=p["BLOCK_D"], num_warps=p["num_warps"],
                                                 num_stages=p["num_stages"])
    if split:
        _combine(inp, args, p["num_splits"])
    return out, lse
