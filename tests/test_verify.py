"""python -m attention.verify: reports, exit codes, and the interpreter environment it sets."""

import json
import os
import subprocess
import sys

import pytest
import torch

import attention
import python_ref
from attention import verify
from attention.registry import Backend

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
    devices = frozenset({"cpu"})
    priority = 10_000
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
