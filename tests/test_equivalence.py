"""The equivalence matrix: every registered backend x its devices here x its dtypes x every case,
against the float64 oracle at docs/spec.md tolerances, each case run twice (determinism).

Generated from the registry: a new backend gets these tests by registering itself.
"""

import functools

import pytest
import torch

import attention
from attention.registry import ATTENTION_FEATURES
from attention.testing import CASES, DTYPE_NAMES, DTYPES, oracle, run_case


def _matrix():
    for b in attention.backends("attention"):
        for dev in b.test_devices():
            for dt in sorted(set(b.dtypes) & set(DTYPES), key=lambda d: DTYPE_NAMES[d]):
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
    """The comparison is live: run_case fails a backend whose output is off by a little more than the
    float32 tolerance, and passes the same backend without the perturbation."""
    class OffByALittle(attention.Backend):
        name = "off_by_a_little_test_only"
        ops = {"attention": ATTENTION_FEATURES}
        dtypes = frozenset({torch.float32})
        priorities = {"cpu": 1000}
        delta = 0.0

        def forward(self, inp):
            out, lse = attention.get_backend("reference").forward(inp)
            out = out.clone()
            out.view(-1)[0] += self.delta
            return out, lse

    b = attention.register_backend(OffByALittle())
    try:
        case = CASES[0]
        assert run_case(b.name, case, torch.float32).ok
        b.delta = 2e-4  # docs/spec.md section 4: float32 out tolerance is 1e-4
        res = run_case(b.name, case, torch.float32)
        assert not res.ok and "max |out - ref|" in res.message
    finally:
        attention.unregister_backend(b.name)
