"""Property tests: random shapes and feature combinations vs the float64 oracle (hypothesis)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attention
from attention.testing import TOLERANCES, oracle


@st.composite
def problems(draw):
    Hkv = draw(st.sampled_from([1, 2, 3]))
    H = Hkv * draw(st.sampled_from([1, 2, 4]))
    Dqk = draw(st.integers(1, 40))
    latent = draw(st.booleans())
    Dv = draw(st.integers(1, Dqk)) if latent else draw(st.integers(1, 24))
    Dr = draw(st.sampled_from([0, 0, 4, 7]))
    bs = draw(st.sampled_from([1, 1, 2, 3]))
    K = draw(st.integers(0, 20))
    B = draw(st.integers(1, 3))
    seqs = [(draw(st.integers(0, 4)), draw(st.integers(0, 30))) for _ in range(B)]
    paged = draw(st.booleans())
    page = draw(st.sampled_from([1, 4, 5])) if paged else 0
    causal = draw(st.booleans())
    sink = draw(st.booleans())
    shared = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(Hkv=Hkv, H=H, Dqk=Dqk, latent=latent, Dv=Dv, Dr=Dr, bs=bs, K=K, seqs=seqs, page=page,
                causal=causal, sink=sink, shared=shared, seed=seed)


def build(p):
    g = torch.Generator().manual_seed(p["seed"])
    T = sum(lq for lq, _ in p["seqs"])
    lens = [lk for _, lk in p["seqs"]]
    B = len(lens)
    Hkv, H, Dqk, Dr = p["Hkv"], p["H"], p["Dqk"], p["Dr"]
    widths = [Dqk] + ([Dr] if Dr else []) + ([] if p["latent"] else [p["Dv"]])
    args = dict(q=torch.randn(T, H, Dqk, generator=g))
    if Dr:
        args["q_rope"] = torch.randn(T, H, Dr, generator=g)
    if p["page"]:
        page = p["page"]
        need = [math.ceil(lk / page) for lk in lens]
        P = sum(need) + 1
        perm = torch.randperm(P, generator=g).tolist()
        table = torch.full((B, max(need + [1])), -1, dtype=torch.int32)
        k = 0
        for b in range(B):
            for j in range(need[b]):
                table[b, j] = perm[k]
                k += 1
        stores = [torch.randn(P, page, Hkv, w, generator=g) for w in widths]
        args.update(block_table=table, seqlens_k=torch.tensor(lens, dtype=torch.int32))
    else:
        S = sum(lens)
        stores = [torch.randn(S, Hkv, w, generator=g) for w in widths]
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        args["cu_seqlens_k"] = cu
    args["cu_seqlens_q"] = torch.tensor([0] + [lq for lq, _ in p["seqs"]]).cumsum(0).to(torch.int32)
    args["kv"] = stores[0]
    if Dr:
        args["kv_rope"] = stores[1]
    if p["latent"]:
        args["d_v"] = p["Dv"]
    else:
        args["v"] = stores[-1]
    G = 1 if p["shared"] else Hkv
    hi = max(lens + [1]) // p["bs"] + 3
    args["indices"] = torch.randint(-2, hi, (T, G, p["K"]), generator=g, dtype=torch.int32)
    args["block_size"] = p["bs"]
    args["causal"] = p["causal"]
    if p["sink"]:
        args["attn_sink"] = torch.randn(H, generator=g)
    return args


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_reference_matches_oracle_on_random_problems(p):
    args = build(p)
    out, lse = attention.selective_attention(**args, return_lse=True)
    ref_out, ref_lse = oracle(args)
    tol_out, tol_lse = TOLERANCES[torch.float32]
    assert (out.double() - ref_out).abs().max().item() <= tol_out if out.numel() else True
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert (lse.double() - ref_lse)[finite].abs().max().item() <= tol_lse
    assert not torch.isnan(out).any()


OTHER_CPU_BACKENDS = [b.name for b in attention.backends("attention") if b.name != "reference" and "cpu" in b.test_devices()]


@pytest.mark.parametrize("backend", OTHER_CPU_BACKENDS)
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_other_cpu_backends_match_oracle_on_random_problems(backend, p):
    args = build(p)
    inp = attention.validate(**args)
    # A declined problem is not a pass: Hypothesis discards it and draws another, and a backend that
    # declines every problem fails as Unsatisfiable instead of passing without a check.
    assume(not attention.get_backend(backend).not_supported_reasons(inp))
    out, lse = attention.selective_attention(**args, return_lse=True, backend=backend)
    ref_out, ref_lse = oracle(args)
    if out.numel():
        assert (out.double() - ref_out).abs().max().item() <= TOLERANCES[torch.float32][0]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
