"""python -m attention.verify: reports, exit codes, and the interpreter environment it sets."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import attention
import python_ref
from attention import verify
from attention.registry import ATTENTION_FEATURES, Backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def test_cli_passes_and_writes_reports(tmp_path):
    r = subprocess.run([sys.executable, "-m", "attention.verify", "--device", "cpu", "--backend", "reference",
                        "--case", "mqa_latent", "--case", "paged_latent_rope_sink_causal", "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "reference/bfloat16" in r.stdout
    doc = json.loads((tmp_path / "verify-cpu.json").read_text())
    assert doc["verdict"] == "PASS" and doc["device"] == "cpu"
    assert doc["counts"] == {"passed": 6, "failed": 0, "skipped": 0}  # 2 cases x 3 dtypes
    assert {(r["case"], r["dtype"]) for r in doc["results"]} == {
        (c, d) for c in ("mqa_latent", "paged_latent_rope_sink_causal") for d in ("float32", "float16", "bfloat16")}
    assert all(r["out_err"] <= 3e-2 for r in doc["results"])
    md = (tmp_path / "verify-cpu.md").read_text()
    assert "| mqa_latent |" in md and "**PASS**" in md
    # The vendors' rules, per case: the reference passes both (float64 golden, one rounding).
    assert all(r["cos_diff"] < 1e-5 and r["cann_pass"] for r in doc["results"])
    assert "CANN check_result" in r.stdout and "CANN check_result" in md


def test_cli_turns_on_the_triton_interpreter_for_cpu(tmp_path):
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "attention.verify", "--device", "cpu", "--backend", "reference",
                        "--case", "k_one", "--dtype", "float32", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "verify-cpu.json").read_text())
    assert doc["machine"]["TRITON_INTERPRET"] == "1"
    assert doc["machine"]["ATTENTION_NAN_FILL"] == "1"


class _OffByOne(Backend):
    name = "off-for-verify-test"
    priorities = {"cpu": 10_000}
    ops = {"attention": ATTENTION_FEATURES}
    dtypes = frozenset({torch.float32})

    def forward(self, inp):
        out, lse = python_ref.selective_attention(inp.q, inp.kv, inp.indices, **inp.reference_kwargs())
        return out, lse + 1.0  # right output, wrong lse: must still fail


def test_failure_exits_one_and_reports_it(tmp_path, capsys):
    attention.register_backend(_OffByOne(), replace=True)
    try:
        rc = verify.main(["--device", "cpu", "--backend", "off-for-verify-test", "--case", "mqa_latent",
                          "--case", "k_zero", "--out", str(tmp_path)])
    finally:
        attention.unregister_backend("off-for-verify-test")
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAIL off-for-verify-test/float32/mqa_latent" in out
    doc = json.loads((tmp_path / "verify-cpu.json").read_text())
    assert doc["verdict"] == "FAIL"
    bad = {r["case"]: r for r in doc["results"]}
    assert not bad["mqa_latent"]["ok"] and "lse" in bad["mqa_latent"]["message"]
    assert bad["k_zero"]["ok"]  # every lse is -inf there, and -inf + 1 is still -inf
    assert "**FAIL**" in (tmp_path / "verify-cpu.md").read_text()


def test_usage_errors_exit_two(capsys):
    assert verify.main(["--device", "cpu", "--backend", "no-such-backend"]) == 2
    assert verify.main(["--device", "cpu", "--case", "no-such-case"]) == 2
    assert verify.main(["--device", "tpu"]) == 2
    if not torch.cuda.is_available():
        assert verify.main(["--device", "cuda"]) == 2
    assert verify.main(["--device", "cpu", "--list"]) == 0
    assert "paged_latent_rope_sink_causal" in capsys.readouterr().out


# ------------------------------------------------------------------ the vendors' rules

from attention.vendor_rules import cann_check_result, cosine_diff  # noqa: E402


def test_flashmla_cosine_difference_by_hand():
    t = torch.tensor
    assert cosine_diff(t([1.0, 2.0]), t([1.0, 2.0])) == 0.0
    assert cosine_diff(t([1.0, 0.0]), t([0.0, 1.0])) == 1.0  # orthogonal
    assert cosine_diff(t([1.0, -2.0]), t([-1.0, 2.0])) == 2.0  # opposite
    assert abs(cosine_diff(t([3.0, 4.0]), t([4.0, 3.0])) - 0.04) < 1e-15  # 1 - 2*24/50
    assert cosine_diff(torch.zeros(3), torch.zeros(3)) == 0.0  # identical, though the literal formula says 1
    assert math.isnan(cosine_diff(t([1.0, float("nan")]), t([1.0, 1.0])))
    # float64 throughout: x = (1 + e) y gives e^2 / (2 + 2e + e^2), 5e-11 here, which float32 sums round to 0.
    e = 1e-5
    d = cosine_diff(torch.full((64,), 1 + e, dtype=torch.float64), torch.ones(64))
    assert abs(d - e * e / (2 + 2 * e + e * e)) < 1e-15 and d > 0
    with pytest.raises(ValueError):
        cosine_diff(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize("dtype,inside,outside", [
    (torch.bfloat16, 1.0 + 2 ** -7, 1.0 + 2 ** -6),  # bf16: rtol 2^-7, atol 1e-4
    (torch.float16, 1.0 + 2 ** -8, 1.0 + 2 ** -7),  # others: rtol 0.005, atol 2.5e-5
    (torch.float32, 1.004, 1.006),
])
def test_cann_check_result_by_hand(dtype, inside, outside):
    golden = torch.ones(1000)
    x = torch.ones(1000, dtype=dtype)
    x[:5] = inside  # within tolerance: still 100%
    assert cann_check_result(x, golden) == (True, 100.0)
    x[:5] = outside  # 5 of 1000 out: 99.5%, exactly CANN's threshold
    passed, pct = cann_check_result(x, golden)
    assert passed and abs(pct - 99.5) < 1e-9
    x[5] = outside  # 6 of 1000: 99.4% fails
    passed, pct = cann_check_result(x, golden)
    assert not passed and abs(pct - 99.4) < 1e-9


def test_cann_check_result_nan_inf_and_empty():
    nan, inf = float("nan"), float("inf")
    g = torch.tensor([nan, inf, -inf, 0.0])
    assert cann_check_result(torch.tensor([nan, inf, -inf, 0.0]), g) == (True, 100.0)
    assert cann_check_result(torch.tensor([0.0, inf, inf, nan]), g) == (False, 25.0)
    assert cann_check_result(torch.zeros(0), torch.zeros(0)) == (True, 100.0)
    assert cann_check_result(torch.zeros(2), torch.zeros(3)) == (False, 0.0)


class _Scaled(Backend):
    """The right answer times (1 + 2^-6): FlashMLA's and CANN's rules must both reject it."""
    name = "scaled-for-verify-test"
    priorities = {"cpu": 10_000}
    ops = {"attention": ATTENTION_FEATURES}
    dtypes = frozenset({torch.float32})

    def forward(self, inp):
        out, lse = python_ref.selective_attention(inp.q, inp.kv, inp.indices, **inp.reference_kwargs())
        return out * (1 + 2 ** -6), lse


def test_verify_reports_the_vendor_metrics(tmp_path, capsys):
    attention.register_backend(_Scaled(), replace=True)
    try:
        verify.main(["--device", "cpu", "--backend", "scaled-for-verify-test", "--case", "mqa_latent",
                     "--out", str(tmp_path)])
    finally:
        attention.unregister_backend("scaled-for-verify-test")
    out = capsys.readouterr().out
    assert "FlashMLA cosine difference" in out and "CANN check_result" in out
    (r,) = json.loads((tmp_path / "verify-cpu.json").read_text())["results"]
    e = 2 ** -6  # x = (1 + e) y: 1 - 2(1 + e) / (1 + (1 + e)^2)
    assert abs(r["cos_diff"] - e * e / (2 + 2 * e + e * e)) < 1e-7
    assert r["cann_pass"] is False and r["cann_percent"] < 50
    row = next(line for line in out.splitlines() if line.startswith("mqa_latent") and "%" in line)
    assert f"{r['cos_diff']:.1e}!" in row and f"{r['cann_percent']:.1f}%!" in row
    assert "CANN check_result" in (tmp_path / "verify-cpu.md").read_text()


def test_verify_runs_the_quantized_cases(tmp_path):
    """The matrix's fp8 / int8 cache cases run in verify like every other case; a backend that
    does not declare kv_fp8 / kv_int8 is reported as skipped with its reason, not failed."""
    cases = ["fp8_paged_latent_rope_sink_causal", "int8_gqa_separate_v_paged"]
    argv = ["--device", "cpu", "--backend", "reference", "--backend", "triton", "--dtype", "bfloat16",
            "--out", str(tmp_path)]
    for c in cases:
        argv += ["--case", c]
    assert verify.main(argv) == 0
    doc = json.loads((tmp_path / "verify-cpu.json").read_text())
    ref = [r for r in doc["results"] if r["backend"] == "reference"]
    assert {r["case"] for r in ref} == set(cases) and all(r["ok"] and not r["skipped"] for r in ref)
    for r in doc["results"]:
        if r["backend"] == "triton":  # passes, or (until its kernel dequantizes) skips for that reason
            assert r["ok"] and (not r["skipped"] or "features not supported: kv_" in r["message"])
