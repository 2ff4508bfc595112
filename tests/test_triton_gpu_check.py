"""The GPU check's CPU-runnable logic: its dry run on the interpreter with tiny shapes, the report it
writes, and the shell script's syntax. (The cuda steps themselves need a GPU.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_triton_check as gc  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_dry_run_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_TUNING_DIR", str(tmp_path / "tuning"))
    out = tmp_path / "out"
    rc = gc.main(["all", "--device", "cpu", "--out", str(out), "--dtype", "bfloat16"])
    assert rc == 0
    matrix = json.loads((out / "triton_matrix_bfloat16.json").read_text())
    assert matrix["passed"] == 2 and matrix["failed"] == 0
    check = json.loads((out / "triton_check.json").read_text())
    assert check["correct"]["ok"] is True and check["cuda_graph"]["ok"] is None
    bench = json.loads((out / "triton_bench.json").read_text())
    (row,) = bench["rows"]
    assert row["correct"] is True and row["us_kernel"] > 0 and row["dense_backend"] and row["speedup_vs_dense"] > 0
    md = (out / "docs" / "benchmarks" / "cpu-interpreter.md").read_text()
    assert "dry run on the Triton interpreter" in md and "| tiny |" in md and "2 passed, 0 failed" in md
    assert (out / "docs" / "benchmarks" / "cpu-interpreter.json").exists()
    assert (tmp_path / "tuning" / "triton-cpu-interpreter.json").exists()


def test_dense_inputs_hold_the_same_data():
    """The SDPA comparison must see the sparse call's keys: gather a paged cache back to dense."""
    from attention import tune

    p = tune.PRESETS["tiny"]
    args = tune.make_inputs(p, "cpu")
    qd, k, v = gc._dense_inputs(args, p)
    assert qd.shape == (p.seqs, p.H, p.q_per_seq, p.Dqk) and k.shape == (p.seqs, p.Hkv, p.context, p.Dqk)
    kv, bt = args["kv"], args["block_table"]
    b, pos = 1, 37
    assert torch.equal(k[b, 0, pos], kv[bt[b, pos // p.page_size], pos % p.page_size, 0])
    assert torch.equal(v, k[..., :p.Dv])


def test_shell_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run([bash, "-n", str(script)], check=True)
    text = script.read_text()
    for needed in ("pip install --no-deps --no-build-isolation -e .", "gpu_selection_check.py", "OUT=",
                   "gpu_triton_check.py check", "gpu_triton_check.py tune", "gpu_triton_check.py bench"):
        assert needed in text


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need the interpreter")
@pytest.mark.parametrize("q_per_seq,causal", [(1, False), (3, True)])
def test_dense_sdpa_baseline_computes_the_same_attention(q_per_seq, causal):
    """With every visible position selected, the sparse op and the benchmark's dense SDPA agree:
    the speedup compares like with like (same data, scale, causal alignment, head folding)."""
    import dataclasses

    import attention
    from attention import tune

    p = dataclasses.replace(tune.PRESETS["tiny"], q_per_seq=q_per_seq, context=32, K=32, causal=causal)
    args = tune.make_inputs(p, "cpu")
    inp = attention.validate(**args)
    out, _ = attention.selective_attention(**args, backend="triton", return_lse=True)
    qd, k, v = gc._dense_inputs(args, p)
    fn, be = gc._sdpa(qd, k, v, p.causal, inp.sm_scale)
    assert fn is not None, be
    dense = fn()  # [B, H, lq, Dv], or [B, 1, H * lq, Dv] when heads were folded
    dense = dense.reshape(p.seqs, p.H, p.q_per_seq, p.Dv).permute(0, 2, 1, 3).reshape(out.shape)
    assert ("folded" in be) == (not causal)
    assert (dense - out).abs().max() < 1e-4
