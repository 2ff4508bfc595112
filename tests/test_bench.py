"""python -m bench: the correctness gate, the output files and the FLOP model."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import attention
import python_ref
from attention.inputs import FLOAT_DTYPES
from attention.registry import ATTENTION_FEATURES, Backend

from bench import report, runner, summarize
from bench.presets import dsv32, dsv32_selection, nsa
from bench.problems import byte_count, flop_count, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dsv32("tiny-decode", batch=2, q_per_seq=2, context=300, H=4, Dqk=64, Dv=32, K=40, page_size=16)


class _WrongBackend(Backend):
    """Registered only inside these tests: the reference answer, slightly off."""

    name = "wrong-for-test"
    priorities = {"cpu": 10_000}
    ops = {"attention": ATTENTION_FEATURES}
    dtypes = frozenset(FLOAT_DTYPES)

    def forward(self, inp):
        out, lse = python_ref.selective_attention(inp.q, inp.kv, inp.indices, **inp.reference_kwargs())
        return out + 0.25, lse


class _UnwrittenBackend(Backend):
    """Returns its output buffers without writing them: must fail once outputs start as NaN."""

    name = "unwritten-for-test"
    priorities = {"cpu": 10_000}
    ops = {"attention": ATTENTION_FEATURES}
    dtypes = frozenset(FLOAT_DTYPES)

    def forward(self, inp):
        return self.new_outputs(inp)


class _RaisingBackend(Backend):
    name = "raising-for-test"
    priorities = {"cpu": 10_000}
    ops = {"attention": ATTENTION_FEATURES}
    dtypes = frozenset(FLOAT_DTYPES)

    def forward(self, inp):
        raise RuntimeError("kernel exploded")


@pytest.fixture
def test_backends():
    bs = [_WrongBackend(), _UnwrittenBackend(), _RaisingBackend()]
    for b in bs:
        attention.register_backend(b, replace=True)
    try:
        yield [b.name for b in bs]
    finally:
        for b in bs:
            attention.unregister_backend(b.name)


def _run(problems, names, baselines=False):
    return runner.run(problems, preset="test", device="cpu", backend_names=names, warmup=1, repeats=2,
                      min_sample_s=0.0, include_baselines=baselines, quick_limits=True)


def test_gate_refuses_wrong_backends(test_backends):
    doc = _run([TINY], ["reference"] + test_backends)
    rows = {r["impl"]: r for r in doc["results"]}
    assert rows["reference"]["status"] == "ok"
    assert rows["reference"]["median_ms"] > 0 and rows["reference"]["tflops"] > 0
    assert rows["wrong-for-test"]["status"] == "FAIL"
    assert rows["wrong-for-test"]["max_out_err"] == pytest.approx(0.25, rel=0.05)
    assert "max |out - ref|" in rows["wrong-for-test"]["reason"]
    assert rows["unwritten-for-test"]["status"] == "FAIL"
    assert rows["raising-for-test"]["status"] == "error"
    assert "kernel exploded" in rows["raising-for-test"]["reason"]
    for name in test_backends:  # a failing implementation never gets a speed
        r = rows[name]
        for k in ("median_ms", "min_ms", "samples_ms", "tflops", "gbps", "frac_matmul_peak", "speedup_vs_dense"):
            assert r[k] is None, (name, k)
    table = report.table(doc["results"], doc["limits"], doc["machine"])
    line = next(l for l in table.splitlines() if l.strip().startswith("wrong-for-test"))
    assert "FAIL" in line and "0.25" in line
    assert line.split()[2] == "-"  # no median time printed


def test_main_exit_code_and_table_on_failure(test_backends, tmp_path, capsys):
    rc = runner.main(["--preset", "custom", "--context", "200", "--heads", "4", "--dqk", "64", "--dv", "32",
                      "--topk", "16", "--backends", "reference,wrong-for-test", "--no-baselines",
                      "--repeats", "2", "--warmup", "1", "--out", str(tmp_path), "--no-plots"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "wrong-for-test" in out and "FAIL" in out
    assert runner.main(["--backends", "no-such-backend"]) == 2


def test_json_csv_and_plots(tmp_path):
    problems = [TINY.with_overrides(context=c) for c in (200, 400)]
    rc = runner.main(["--preset", "custom", "--context", "200,400", "--heads", "4", "--dqk", "64", "--dv", "32",
                      "--topk", "40", "--tokens", "2", "--batch", "2", "--page-size", "16",
                      "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "custom.json").read_text())
    assert doc["schema"] == report.SCHEMA
    for key in ("machine", "limits", "timing", "model", "results", "preset", "command"):
        assert key in doc
    for key in ("torch", "device_name", "cpu", "python", "git_commit", "time_utc"):
        assert key in doc["machine"]
    assert doc["limits"]["matmul_peak_gflops"] > 0 and doc["limits"]["copy_gbps"] > 0
    impls = {r["impl"] for r in doc["results"]}
    assert {"reference", "sdpa-dense"} <= impls
    assert {r["context"] for r in doc["results"]} == {p.context for p in problems}
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"reference", "sdpa-dense"}
    for r in ok:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] and len(r["samples_ms"]) == 2
        assert r["max_out_err"] <= r["tol_out"]
        assert r["speedup_vs_dense"] > 0 and r["dense_impl"] == "sdpa-dense"
    with open(tmp_path / "custom.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.CSV_FIELDS
        rows = list(reader)
    assert len(rows) == len(doc["results"])
    assert all(r["torch"] == torch.__version__ and r["device_name"] for r in rows)
    for name in ("custom-time.png", "custom-tflops.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = summarize.summarize(doc)
    assert md.count("| custom/L=200 | reference | ok |") == 1
    assert "| custom/L=400 | sdpa-dense (baseline) | ok | 1.00 (1.00) |" in md


def test_model_counts():
    p = dsv32("m", batch=4, q_per_seq=1, context=32768)
    kept = 4 * 2048  # every index valid: T * K per kv head
    assert flop_count(p, kept) == 2 * 4 * 128 * 2048 * 576 + 2 * 4 * 128 * 2048 * 512
    # kv rows once per token (latent: value inside the row) + q + out + int32 indices, bfloat16
    assert byte_count(p, kept) == 2 * (kept * 576 + 4 * 128 * 576 + 4 * 128 * 512) + 4 * 2048 * 4
    inp = make_inputs(dsv32("m", batch=2, q_per_seq=1, context=3000, H=4, Dqk=64, Dv=32, K=100, page_size=64), "cpu")
    assert inp.kept == 2 * 100
    # causal blocks: early tokens see fewer positions, and kept counts only the visible part
    q = nsa("n", batch=1, q_per_seq=64, context=64, H=16, Hkv=1, Dqk=16, Dv=16, K=4, block_size=8)
    inq = make_inputs(q, "cpu")
    brute = 0
    for t in range(64):  # q_pos = t; count positions p = block*8 + r with p <= t
        for blk in inq.indices[t, 0].tolist():
            brute += sum(1 for r in range(8) if blk >= 0 and blk * 8 + r <= t)
    assert inq.kept == brute
    assert brute == sum(t + 1 for t in range(32)) + sum(  # first 32 tokens see all their blocks
        brute_t for brute_t in [sum(min(8, t + 1 - b * 8) for b in inq.indices[t, 0].tolist()) for t in range(32, 64)])


def test_dense_baselines_pass_the_gate_with_gqa_blocks():
    """The dense mask means the same as the index list, per kv head, with blocks and causality."""
    p = nsa("gqa", batch=2, q_per_seq=24, context=40, H=8, Hkv=2, Dqk=16, Dv=8, K=3, block_size=4, page_size=8)
    doc = _run([p], ["reference"], baselines=True)
    rows = {r["impl"]: r for r in doc["results"]}
    for name in ("reference", "sdpa-dense", "dense-matmul"):
        assert rows[name]["status"] == "ok", rows[name]["reason"]
    assert rows["flashmla-sparse"]["status"] == "n/a"


def test_selection_is_checked_then_timed():
    sp = dsv32_selection("sel", T=3, context=300, Hi=4, Di=16, k=32, dtype="float32")
    doc = _run([sp], None, baselines=True)
    rows = {r["impl"]: r for r in doc["results"]}
    for name in ("attention.select", "attention.lightning_indexer+topk_indices", "dense-scores+torch.topk"):
        assert rows[name]["status"] == "ok", rows[name]["reason"]
        assert rows[name]["checked_tokens"] == 3 and rows[name]["median_ms"] > 0


@pytest.mark.slow
def test_smoke_preset_cli(tmp_path):
    """The documented command: python -m bench --preset smoke --out DIR (CI runs this)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # As a user runs it: the CPU production paths, not Triton through its interpreter (conftest
    # turns that on for the equivalence tests; at smoke shapes it takes minutes).
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "bench", "--preset", "smoke", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "x vs dense" in r.stdout and "smoke-mla-decode/L=1024" in r.stdout
    for name in ("smoke.json", "smoke.csv", "smoke-time.png", "smoke-tflops.png"):
        assert (tmp_path / name).stat().st_size > 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert all(r["status"] in ("ok", "n/a") for r in doc["results"])


@pytest.mark.parametrize("mode", ["fold", "gqa", "expand"])
def test_sdpa_baseline_head_sharing_modes(mode, monkeypatch):
    """Each way the dense baseline shares kv heads (CPU folds; GPUs use enable_gqa or expand) is the
    same math: forced here on CPU tensors and checked against float64."""
    from bench import baselines
    from bench.problems import check_tokens, expected_float64

    monkeypatch.setattr(baselines, "sdpa_mode", lambda dev, hg: mode if hg > 1 else "mha")
    for p in (nsa("g", batch=2, q_per_seq=24, context=40, H=8, Hkv=2, Dqk=16, Dv=8, K=3, block_size=4, page_size=8),
              dsv32("d", batch=2, q_per_seq=2, context=300, H=4, Dqk=64, Dv=32, Dr=16, K=40, page_size=16)):
        inp = make_inputs(p, "cpu")
        tokens = check_tokens(p)
        impl = baselines.DenseSDPA()
        verdict = runner._check_attention(impl.prepare(inp)(), inp, expected_float64(inp, tokens), tokens, impl)
        assert verdict["ok"], (mode, p.family, verdict["reason"])


@pytest.mark.parametrize("qt", ["fp8", "int8"])
def test_quantized_problem_is_checked_timed_and_counted_as_656_byte_rows(tmp_path, qt):
    """--kv-quant: the cache is quantized (the float64 gate reads the dequantized logical values), the
    dense baselines (float caches) are not run, and the byte model counts FlashMLA's record."""
    p = dsv32("m", batch=4, q_per_seq=1, context=32768, Dqk=512, Dr=64, kv_quant=qt)
    kept = 4 * 2048
    assert byte_count(p, kept) == kept * 656 + 2 * (4 * 128 * 576 + 4 * 128 * 512) + 4 * 2048 * 4
    rc = runner.main(["--preset", "custom", "--context", "300", "--heads", "4", "--dqk", "64", "--dr", "16",
                      "--dv", "64", "--topk", "40", "--kv-quant", qt, "--repeats", "2", "--warmup", "1",
                      "--backends", "reference", "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    doc = json.loads((tmp_path / "custom.json").read_text())
    rows = doc["results"]
    assert [r["impl"] for r in rows] == ["reference"] and rows[0]["status"] == "ok"
    assert f"kv {qt}" in rows[0]["shape"] and rows[0]["max_out_err"] <= rows[0]["tol_out"]
    inp = make_inputs(dsv32("m", batch=1, q_per_seq=1, context=100, H=4, Dqk=64, Dr=16, Dv=64, K=10, kv_quant=qt),
                      "cpu")
    assert inp.kwargs["kv"].dtype == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}[qt]
    assert inp.kv_log.dtype == torch.float32


def test_one_problem_description():
    # The matrix, the tune presets, bench's presets (the indexer + top-k ones included) and
    # compile_budget's problems are all Cases: a uniform problem is a Case made by testing.Problem,
    # rebuilt from its own fields.
    from attention import tune
    from attention.testing import CASES, Case, Problem
    from bench import compile_budget
    from bench.presets import PRESETS
    from bench.runner import parse_args, problems_from_args
    from bench.selection import make_selection_inputs

    problems = (list(tune.PRESETS.values()) + [p for ps in PRESETS.values() for p in ps]
                + list(compile_budget.PROBLEMS.values()))
    assert all(type(p) is Case for p in problems + CASES)
    for p in problems:
        assert Problem(**p.workload()) == p
        q = p.with_overrides(context=p.context + 64, dtype="float32")
        assert (q.context, q.dtype, q.batch, q.q_per_seq, q.name) == (p.context + 64, "float32", p.batch, p.q_per_seq,
                                                                      f"{p.family}/L={p.context + 64}")
        assert q.T == p.T and q.seqs == ((p.q_per_seq, p.context + 64),) * p.batch
    assert compile_budget.PROBLEMS["nsa-prefill"].op == "attention" and not compile_budget.PROBLEMS["nsa-prefill"].latent
    assert compile_budget.PROBLEMS["dsv32-select-decode"].op == "select"
    # A selection problem is the same Case whichever table declares it: H, Dqk, K are Hi, Di, k.
    assert dsv32_selection("dsv32-select-decode", T=4, context=131072) == compile_budget.PROBLEMS["dsv32-select-decode"]
    sel = PRESETS["selection"]
    assert [(p.op, p.batch, p.causal) for p in sel] == [("select", 1, True)] * 2
    assert sel[0].describe() == "T=4, L=32768, Hi=64, Di=128, k=2048, causal, bfloat16"
    # bench's flags: a selection problem takes tokens, top-k, dtype and context, not the attention's widths.
    (p,) = problems_from_args(parse_args(["--preset", "selection", "--context", "300", "--tokens", "3",
                                          "--topk", "16", "--heads", "8", "--dqk", "32", "--dtype", "float32"]))[:1]
    assert (p.q_per_seq, p.context, p.K, p.H, p.Dqk, p.dtype) == (3, 300, 16, 64, 128, "float32")
    inp = make_selection_inputs(p, "cpu")
    assert (tuple(inp.q_idx.shape), tuple(inp.k_idx.shape), tuple(inp.weights.shape)) == ((3, 64, 128), (300, 128), (3, 64))
    assert inp.q_idx.dtype == torch.float32 and inp.pairs == 298 + 299 + 300
