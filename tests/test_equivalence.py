"""The equivalence matrix: every registered backend x its devices here x its dtypes x every case,
against the float64 oracle at SPEC.md tolerances, each case run twice (determinism).

Generated from the registry: a new backend gets these tests by registering itself.
"""

import functools

import pytest
import torch

import attention
from attention.testing import CASES, DTYPE_NAMES, oracle, run_case


def _matrix():
    for b in attention.backends():
        for dev in b.test_devices():
            for dt in sorted(b.dtypes, key=lambda d: DTYPE_NAMES[d]):
                for case in CASES:
                    yield pytest.param(b.name, dev, dt, case, id=f"{b.name}-{dev}-{DTYPE_NAMES[dt]}-{case.name}")


@functools.lru_cache(maxsize=None)
def _expected(case_name, dtype):
    case = next(c for c in CASES if c.name == case_name)
    return oracle(case.make(dtype, "cpu"))


@pytest.mark.parametrize("backend,device,dtype,case", list(_matrix()))
def test_equivalence(backend, device, dtype, case):
    res = run_case(backend, case, dtype, device, repeats=2, expected=_expected(case.name, dtype))
    if res.skipped:
        pytest.skip(f"{backend}: {res.message}")
    assert res.ok, f"{backend}/{device}/{res.dtype}/{case.name}: {res.message}"


def test_matrix_is_large_enough():
    assert len(CASES) >= 30
    names = {c.name for c in CASES}
    for needed in ("paged_latent_rope_sink_causal", "block_causal_varlen", "gqa_separate_v"):
        assert needed in names


def test_oracle_catches_a_wrong_answer():
    """The comparison is live: a perturbed output must fail."""
    case = CASES[0]
    args = case.make(torch.float32)
    out, lse = oracle(args)
    got, got_lse = attention.selective_attention(**args, return_lse=True)
    assert (got.double() - out).abs().max() <= 1e-4
    bad = got.clone()
    bad[0, 0, 0] += 1e-3
    assert (bad.double() - out).abs().max() > 1e-4
