"""Every CLI of the package (attention.verify, attention.tune, attention.info,
python -m bench and its presets) answers a bad flag or an unwritable output with argparse's error
(exit 2, no traceback) *before* it measures anything, and prints what it measured before writing it.

Unwritable paths are made by putting them under a regular file (ENOTDIR): that holds for root too,
where permission bits do not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attention import _cli, info, tune, tuning, verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def blocker(tmp_path):
    """A regular file: any path below it cannot be created."""
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_TUNING_DIR", str(tmp_path / "store"))
    tuning._cache.clear()
    yield tmp_path / "store"
    tuning._cache.clear()


def _no_work(monkeypatch, module, name):
    """Make ``module.name`` fail the test if anything gets as far as measuring."""
    def boom(*a, **k):
        raise AssertionError(f"{name} ran although the command line was unusable")
    monkeypatch.setattr(module, name, boom)


def _exit_code(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return e.value.code


# --------------------------------------------------------------------------- attention.verify

@pytest.mark.parametrize("where", ["under-a-file", "report-is-a-directory"])
def test_verify_unwritable_out_is_a_usage_error_before_the_matrix(tmp_path, blocker, monkeypatch, capsys, where):
    import attention.testing

    _no_work(monkeypatch, attention.testing, "run_case")
    _no_work(monkeypatch, attention.testing, "oracle")
    if where == "under-a-file":
        out = blocker / "reports"
    else:
        out = tmp_path / "reports"
        (out / "verify-cpu.json").mkdir(parents=True)
    rc = verify.main(["--device", "cpu", "--backend", "reference", "--case", "mqa_latent", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "Traceback" not in err


def test_verify_device_with_a_bad_index_is_a_clean_error(capsys):
    assert verify.main(["--device", "cuda:x"]) == 2
    assert "index" in capsys.readouterr().err


# --------------------------------------------------------------------------- attention.tune

@pytest.mark.parametrize("where", ["store-dir-is-a-file", "store-path-is-a-directory", "store-dir-under-a-file"])
def test_tune_unusable_store_is_a_usage_error_before_measuring(store, blocker, monkeypatch, capsys, where):
    _no_work(monkeypatch, tune, "tune_preset")
    if where == "store-dir-is-a-file":
        monkeypatch.setenv("ATTENTION_TUNING_DIR", str(blocker))
    elif where == "store-dir-under-a-file":
        monkeypatch.setenv("ATTENTION_TUNING_DIR", str(blocker / "tuning"))
    else:
        tuning.store_path(tuning.CPU_DEVICE).mkdir(parents=True)
    assert _exit_code(tune.main, ["--device", "cpu", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "tuning store" in err and "--no-save" in err


def test_tune_unwritable_json_is_a_usage_error_before_measuring(store, blocker, monkeypatch, capsys):
    _no_work(monkeypatch, tune, "tune_preset")
    assert _exit_code(tune.main, ["--device", "cpu", "--preset", "tiny", "--no-save",
                                  "--json", str(blocker / "r.json")]) == 2
    assert "--json" in capsys.readouterr().err


def test_tune_prints_measurements_before_a_failing_write(store, monkeypatch, capsys):
    """A write that fails after measuring (the store changed under the run) loses nothing: the table
    is on stdout and the entry to merge by hand on stderr, exit 2."""
    measured = []

    def one_preset(preset, device, full=False, repeats=3, save=True, check=True):
        assert save is False  # main saves only after printing
        row = dict(preset=preset.family, bucket="b-" + preset.family, tried=2, failed=0, best=dict(BLOCK_N=16),
                   us=1.5, tflops=0.1, base_us=2.0, base_source="default", speedup=1.33,
                   device=tuning.CPU_DEVICE, entry=dict(config=dict(BLOCK_N=16), us=1.5), path=None)
        measured.append(row)
        return row

    def broken_save(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tune, "tune_preset", one_preset)
    monkeypatch.setattr(tuning, "save_entries", broken_save)
    assert tune.main(["--device", "cpu", "--preset", "tiny"]) == 2
    out, err = capsys.readouterr()
    assert measured and "tiny" in out and "best config" in out
    assert json.loads(err.strip().splitlines()[-1]) == {"b-tiny": dict(config=dict(BLOCK_N=16), us=1.5)}


def test_tune_equals_form_of_device_selects_the_interpreter(tmp_path, blocker):
    """`--device=cpu` must turn the interpreter on like `--device cpu` (it used to fail with "needs
    TRITON_INTERPRET=1"); the unwritable --json then stops the run before any measurement."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ATTENTION_TUNING_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "attention.tune", "--device=cpu", "--preset", "tiny", "--no-save",
                        "--json", str(blocker / "r.json")], env=env, capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 2 and "--json" in r.stderr and "TRITON_INTERPRET" not in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_tune_rejects_a_nonpositive_repeat_count(capsys):
    assert _exit_code(tune.main, ["--device", "cpu", "--repeats", "0"]) == 2


# --------------------------------------------------------------------------- attention.info

def test_info_rejects_unknown_flags(capsys):
    assert _exit_code(info.main, ["--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err


# --------------------------------------------------------------------------- python -m bench

def _bench_parse(argv):
    from bench import runner

    return runner.parse_args(argv)


@pytest.mark.parametrize("argv", [
    ["--context", "-5"], ["--context", "0"], ["--context", "4x"], ["--context", ","], ["--context", "1.5"],
    ["--device", "bogus"], ["--device", "cuda:x"], ["--repeats", "0"], ["--warmup", "-1"], ["--threads", "0"],
    ["--min-sample-ms", "nan"], ["--batch", "0"], ["--heads", "-1"], ["--topk", "0"], ["--page-size", "-1"],
    ["--heads", "3", "--kv-heads", "2"], ["--dqk", "64", "--dv", "128"],
], ids=" ".join)
def test_bench_bad_flags_are_usage_errors(argv, capsys):
    assert _exit_code(_bench_parse, argv) == 2
    assert "error:" in capsys.readouterr().err


def test_bench_device_not_present_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _exit_code(_bench_parse, ["--device", "cuda"]) == 2


def test_bench_unwritable_out_is_a_usage_error(blocker, capsys):
    assert _exit_code(_bench_parse, ["--out", str(blocker / "results")]) == 2
    assert "--out" in capsys.readouterr().err


def _all_presets():
    from bench.presets import PRESETS

    return sorted(PRESETS) + ["custom"]


@pytest.mark.parametrize("preset", _all_presets())
def test_bench_every_preset_parses_and_rejects_impossible_shapes(preset, capsys):
    """Every preset is valid as shipped, and each turns a shape that cannot be built (more query
    tokens than context) into a usage error rather than a traceback mid-run."""
    from bench import runner

    a = _bench_parse(["--preset", preset])
    assert runner.problems_from_args(a) and all(runner.shape_problem(p) is None for p in runner.problems_from_args(a))
    assert _exit_code(_bench_parse, ["--preset", preset, "--context", "4", "--tokens", "8"]) == 2
    assert "do not fit" in capsys.readouterr().err


# --------------------------------------------------------------------------- shared checks

def test_output_checks(tmp_path, blocker):
    assert _cli.dir_problem(tmp_path / "new" / "dir") is None and (tmp_path / "new" / "dir").is_dir()
    assert "not a directory" in _cli.dir_problem(blocker)
    assert _cli.dir_problem(blocker / "sub") is not None
    assert _cli.file_problem(tmp_path / "x.json") is None and not (tmp_path / "x.json").exists()
    assert "is a directory" in _cli.file_problem(tmp_path)
    assert _cli.file_problem(blocker / "x.json") is not None
    assert _cli.device_arg(["--device=cpu"]) == "cpu" and _cli.device_arg(["--device", "cuda:1"]) == "cuda:1"
