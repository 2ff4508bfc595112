"""bench/gpu_check.sh and its Python steps, run on the CPU: the whole script's dry run (every step that
can run without a GPU runs, on the interpreter), its behaviour under time limits and when killed (with
a stand-in Python whose steps hang or fail), the timing rule, and the dense SDPA baseline."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_triton_check as gc  # noqa: E402

BUDGET_S = 420  # the lent machine gives one try of about 8 minutes: 7 minutes for the steps
STEPS = ["env", "install", "cuda_ext", "matrix_float32", "matrix_float16", "matrix_bfloat16", "check", "tune",
         "bench", "selection", "report"]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _steps(final: Path):
    """steps.txt as {name: (rc, ms, limit_s, start_ms)}."""
    rows = {}
    for line in (final / "steps.txt").read_text().splitlines():
        name, rc, ms, limit, start = line.split()
        rows[name] = (int(rc), int(ms), int(limit), int(start))
    return rows


def _returned(final: Path):
    """What the device tool would bring back: at most 8 plain files of <= 16 MiB, none in a folder."""
    files = sorted(final.iterdir())
    assert len(files) <= 8, files
    for f in files:
        assert f.is_file() and not f.is_symlink(), f
        assert f.stat().st_size <= 16 << 20, f
    return {f.name for f in files}


def _packed(final: Path):
    """{member name: bytes} of gpu_check.tgz."""
    with tarfile.open(final / "gpu_check.tgz") as t:
        return {m.name.lstrip("./"): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def _run_script(tmp_path, env_extra, python=sys.executable, popen=False):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET", "PYTHONPATH")}
    env.update(OUT=str(tmp_path / "final"), GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=str(python), **env_extra)
    cmd = ["bash", str(SCRIPT)]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)


def _fake_python(tmp_path) -> Path:
    """A stand-in for the GPU machine's python: hangs when its arguments match $FAKE_HANG, fails when
    they match $FAKE_FAIL, else writes $OUT/fake_<args>.txt (the script's scratch folder) and succeeds."""
    fake = tmp_path / "python"
    fake.write_text("""#!/usr/bin/env bash
args="$*"
if [ -n "${FAKE_HANG:-}" ] && [[ "$args" == *$FAKE_HANG* ]]; then exec sleep 600; fi
if [ -n "${FAKE_FAIL:-}" ] && [[ "$args" == *$FAKE_FAIL* ]]; then echo "fake failure"; exit 1; fi
name=$(printf '%s' "$args" | tr -c 'a-zA-Z0-9' '_' | cut -c1-80)
echo "$args" > "$OUT/fake_$name.txt"
""")
    fake.chmod(0o755)
    return fake


@needs_bash
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The whole script on the CPU: install (pip --dry-run), CUDA build (nothing to build), matrix,
    check, tune, bench, selection and report all run for real on the interpreter, and what comes back
    fits the device tool's limits. Limits are scaled x4: this machine is slower than the GPU host."""
    import triton

    r = _run_script(tmp_path, dict(GPU_CHECK_DEVICE="cpu", GPU_CHECK_TIME_SCALE="400"))
    final = tmp_path / "final"
    steps = _steps(final)
    assert r.returncode == 0, (steps, r.stdout[-4000:])
    assert set(steps) == set(STEPS) and all(rc == 0 for rc, *_ in steps.values()), steps
    names = _returned(final)
    assert {"gpu_check.tgz", "steps.txt", "summary.txt", "report.md", "report.json", "selection_check.txt"} <= names
    packed = _packed(final)
    for dt in ("float32", "float16", "bfloat16"):
        m = json.loads(packed[f"triton_matrix_{dt}.json"])
        assert m["passed"] >= 1 and m["failed"] == 0, m
        assert m["versions"]["triton"] == triton.__version__
    check = json.loads(packed["triton_check.json"])
    assert check["correct"]["ok"] is True and check["cuda_graph"]["ok"] is None
    (row,) = json.loads(packed["triton_bench.json"])["rows"]
    assert row["correct"] is True and row["samples"] == 3 and row["us_kernel"] > 0
    assert row["tflops_all_k"] > 0 and row["tflops_kept"] == pytest.approx(row["tflops_all_k"] * row["kept_fraction"])
    assert row["dense_backend"] and row["speedup_vs_dense"] > 0
    assert "tuning/triton-cpu-interpreter.json" in packed
    sel = json.loads(packed["selection_check.json"])
    assert sel["failures"] == [] and len(sel["checks"]) >= 4 and sel["triton"] == triton.__version__
    # No install was made (pip --dry-run), so the package came from this checkout.
    assert Path(sel["attention_from"]) == ROOT / "attention"
    md = (final / "report.md").read_text()
    assert "dry run on the Triton interpreter" in md and "TF/s (kept)" in md and "TF/s (all K)" in md
    assert "| tiny |" in md and "1 passed, 0 failed" in md
    assert json.loads((final / "report.json").read_text())["meta"]["triton"] == triton.__version__


@needs_bash
def test_every_step_is_cut_at_its_limit_and_all_fit_the_budget(tmp_path):
    """Every step hangs: each is stopped at its own limit and the run goes on, and the worst case of
    the whole run fits in 7 minutes. That worst case is the longest chain of steps, each at its limit
    plus the kill grace, where a step follows every step that had ended when it started in this run
    (parallel steps overlap). Limits are scaled to 3% so this takes seconds; the chain uses the
    recorded limits, not the measured times, because process start-up is not scaled."""
    scale = 3
    t0 = time.time()
    r = _run_script(tmp_path, dict(GPU_CHECK_TIME_SCALE=str(scale), FAKE_HANG="*"), python=_fake_python(tmp_path))
    wall = time.time() - t0
    final = tmp_path / "final"
    steps = _steps(final)
    assert r.returncode != 0 and set(steps) == set(STEPS), (steps, r.stdout[-3000:])
    for name, (rc, ms, limit, _) in steps.items():
        assert rc in (124, 137), (name, rc)
        assert 0.9 * limit * 10 * scale <= ms <= limit * 10 * scale + 500, (name, ms, limit)
    grace = 2  # gpu_check.sh's GRACE: TERM, then KILL this much later
    worst = {}
    for name, (_, _, limit, start) in sorted(steps.items(), key=lambda kv: kv[1][3]):
        before = [worst[m] for m, (_, ms, _, st) in steps.items() if m in worst and st + ms <= start]
        worst[name] = max(before, default=0) + limit + grace
    assert max(worst.values()) <= BUDGET_S, worst
    assert worst["report"] == max(worst.values())  # the report is the last link, and limited too
    assert wall < BUDGET_S * scale / 100 + 30
    assert {"gpu_check.tgz", "steps.txt", "summary.txt"} <= _returned(final)


@needs_bash
def test_a_killed_run_returns_every_finished_step(tmp_path):
    """SIGKILL during the tune step: everything finished before it is already in $OUT. The CUDA
    extension build fails on the way: the install and the steps after it are unaffected."""
    p = _run_script(tmp_path, dict(FAKE_HANG="gpu_triton_check.py tune", FAKE_FAIL="build_ext.py"),
                    python=_fake_python(tmp_path), popen=True)
    final = tmp_path / "final"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((final / "steps.txt").exists()
                                              and "check" in _steps(final)):
            time.sleep(0.1)
        time.sleep(0.5)  # tune is running (hanging) now
        assert p.poll() is None, p.stdout.read().decode()[-3000:]
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:  # already ended (the assertion above then says why)
            pass
        p.wait()
    steps = _steps(final)
    assert steps["install"][0] == 0 and steps["cuda_ext"][0] == 1 and steps["check"][0] == 0
    assert "tune" not in steps and "report" not in steps
    packed = _packed(final)
    done = [n for n in packed if n.startswith("fake_")]
    for what in ("matrix", "float32", "float16", "bfloat16", "check", "pip_install"):
        assert any(what in n for n in done), (what, done)
    assert "cuda_ext.log" in packed and b"fake failure" in packed["cuda_ext.log"]
    assert not any("tune" in n for n in done)
    _returned(final)


def test_timings_are_medians_without_the_nan_fill(monkeypatch):
    """gc._bench: one slow outlier among the samples moves a mean, not the median; the NaN fill is
    off during every timed call and restored after."""
    monkeypatch.setenv("ATTENTION_NAN_FILL", "1")
    seen, calls = [], []

    def fn():
        seen.append(os.environ.get("ATTENTION_NAN_FILL"))
        calls.append(1)
        time.sleep(0.2 if len(calls) == 3 else 0.002)  # call 1 warms up; call 3 is the outlier

    t = gc._bench(fn, "cpu", samples=5)
    assert len(t.samples_ms) == 5 and max(t.samples_ms) > 150
    assert t.median_ms < 50
    assert set(seen) == {"0"} and os.environ["ATTENTION_NAN_FILL"] == "1"


def test_install_leaves_the_cuda_extension_to_its_own_step(monkeypatch):
    """ATTENTION_BUILD_CUDA=0 (what gpu_check.sh's install sets) keeps the CUDA extension out of
    setup.py even where torch has CUDA and nvcc exists; the in-place build ignores it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cuda_build_ext", ROOT / "csrc" / "cuda" / "build_ext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(mod, "_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(mod, "_extension", lambda: "attention._cuda_topk")
    monkeypatch.delenv("ATTENTION_BUILD_CUDA", raising=False)
    assert mod.extensions() == ["attention._cuda_topk"]
    monkeypatch.setenv("ATTENTION_BUILD_CUDA", "0")
    assert mod.extensions() == [] and mod.skip_reason() == "ATTENTION_BUILD_CUDA=0"
    assert mod.skip_reason(honour_env=False) is None


def test_dense_inputs_hold_the_same_data():
    """The SDPA comparison must see the sparse call's keys: gather a paged cache back to dense."""
    from attention import tune

    p = tune.PRESETS["tiny"]
    args = tune.make_inputs(p, "cpu")
    qd, k, v = gc._dense_inputs(args, p)
    assert qd.shape == (p.batch, p.H, p.q_per_seq, p.Dqk) and k.shape == (p.batch, p.Hkv, p.context, p.Dqk)
    kv, bt = args["kv"], args["block_table"]
    b, pos = 1, 37
    assert torch.equal(k[b, 0, pos], kv[bt[b, pos // p.page_size], pos % p.page_size, 0])
    assert torch.equal(v, k[..., :p.Dv])


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need the interpreter")
@pytest.mark.parametrize("q_per_seq,causal,kv_quant", [(1, False, None), (3, True, None), (1, False, "fp8"),
                                                      (1, True, "int8")])
def test_dense_sdpa_baseline_computes_the_same_attention(q_per_seq, causal, kv_quant):
    """With every visible position selected, the sparse op and the benchmark's dense SDPA agree:
    the speedup compares like with like (same data, scale, causal alignment, head folding; a quantized
    cache's dequantized values and its separate rope part, as the GPU bench's quantized decodes need)."""
    import attention
    from attention import tune

    extra = dict(Dr=16, kv_quant=kv_quant) if kv_quant else {}
    p = tune.PRESETS["tiny"].with_overrides(q_per_seq=q_per_seq, context=32, K=32, causal=causal, **extra)
    args = tune.make_inputs(p, "cpu")
    inp = attention.validate(**args)
    out, _ = attention.selective_attention(**args, backend="triton", return_lse=True)
    qd, k, v = gc._dense_inputs(args, p)
    fn, be = gc._sdpa(qd, k, v, p.causal, inp.sm_scale)
    assert fn is not None, be
    dense = fn()  # [B, H, lq, Dv], or [B, 1, H * lq, Dv] when heads were folded
    dense = dense.reshape(p.batch, p.H, p.q_per_seq, p.Dv).permute(0, 2, 1, 3).reshape(out.shape)
    assert ("folded" in be) == (not (causal and q_per_seq > 1))
    assert (dense - out).abs().max() < 1e-4
