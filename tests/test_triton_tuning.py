"""The tuned-config store (attention/tuning) and ``python -m attention.tune`` on the interpreter."""

import json
import os
import multiprocessing as mp
import threading
import warnings

import pytest
import torch

import attention
from attention import tuning
from attention.testing import CASES_BY_NAME, TOLERANCES, oracle
from attention.testing import max_error as _max_err

triton = pytest.importorskip("triton")

from attention.backends.triton import BACKEND, launch  # noqa: E402

VERSION = launch.KERNEL_VERSION
# Tests that launch kernels on CPU tensors need the interpreter (always the case in CI).
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="launches on CPU tensors: needs TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_TUNING_DIR", str(tmp_path))
    tuning._cache.clear()
    tuning._warned.clear()
    yield tmp_path
    tuning._cache.clear()


@pytest.mark.parametrize("name,family", [
    ("NVIDIA H200", "NVIDIA H200"), ("NVIDIA H100 80GB HBM3", "NVIDIA H100"), ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"),
    ("NVIDIA L40S", "NVIDIA L40S"), ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
    ("cpu-interpreter", "cpu-interpreter"),
])
def test_shipped_defaults(name, family):
    rec = tuning.shipped_entry("triton", name)
    assert rec is not None and rec["name"] == family
    assert isinstance(rec["measured"], bool) and rec["note"]
    cfg, source = tuning.lookup("triton", name, VERSION, "any-bucket")
    assert source == "default" and cfg == rec["config"]
    if name != "cpu-interpreter":
        # Honesty: no GPU was available when these were written; they must say so.
        assert rec["measured"] is False and "estimate" in rec["note"]


def test_unknown_device_uses_builtin_fallback():
    assert tuning.lookup("triton", "NVIDIA Imaginary 9000", VERSION, "b") is None


def _inp(name="mqa_latent", dtype=torch.float32):
    args = CASES_BY_NAME[name].make(dtype, "cpu")
    return args, attention.validate(**args)


@needs_interpreter
def test_tuned_entry_is_selected_and_runs():
    args, inp = _inp("gqa_latent")
    bucket = launch.shape_bucket(inp)
    cfg = dict(BLOCK_H=16, BLOCK_N=16, BLOCK_D=16, BLOCK_DV=16, num_warps=1, num_stages=1, num_splits=2)
    tuning.save_entries("triton", tuning.CPU_DEVICE, VERSION, {bucket: dict(config=cfg, us=1.0, measured=True)})
    got, source = launch.resolve_config(inp)
    assert source == "tuned" and all(got[k] == v for k, v in cfg.items())
    p = launch.plan(inp, got)
    assert (p["BLOCK_D"], p["BLOCK_DV"], p["num_splits"]) == (16, 16, 1)  # 12 candidates fit one 16-wide tile: nothing to split
    out, lse = launch.forward(inp)
    ref_out, ref_lse = oracle(args)
    assert _max_err(out, ref_out) <= TOLERANCES[torch.float32][0]
    assert _max_err(lse, ref_lse) <= TOLERANCES[torch.float32][1]
    # Another bucket in the same file falls back to the device default.
    _, other = _inp("deepseek_widths")
    assert launch.resolve_config(other)[1] == "default"


def _count_warnings(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [x for x in w if issubclass(x.category, RuntimeWarning) and "tuning file" in str(x.message)]


def test_corrupt_file_is_ignored_with_one_warning(store):
    path = tuning.store_path(tuning.CPU_DEVICE)
    path.write_text('{"format": 1, "entries": {"x": ')  # truncated
    _, inp = _inp()

    def twice():
        a = launch.resolve_config(inp)
        b = launch.resolve_config(inp)
        assert a == b and a[1] == "default"

    w = _count_warnings(twice)
    assert len(w) == 1 and "unreadable" in str(w[0].message)


@pytest.mark.parametrize("field,value", [("kernel_version", "fwd-0"), ("device", "NVIDIA H200"), ("format", 99)])
def test_stale_file_is_ignored_with_one_warning(store, field, value):
    _, inp = _inp()
    bucket = launch.shape_bucket(inp)
    data = dict(format=tuning.FORMAT, backend="triton", device=tuning.CPU_DEVICE, kernel_version=VERSION,
                entries={bucket: dict(config=dict(BLOCK_N=16))})
    data[field] = value
    tuning.store_path(tuning.CPU_DEVICE).write_text(json.dumps(data))
    w = _count_warnings(lambda: [launch.resolve_config(inp) for _ in range(3)])
    assert len(w) == 1 and field in str(w[0].message)
    assert launch.resolve_config(inp)[1] == "default"


def _store_file(entries, default=None, **meta):
    data = dict(format=tuning.FORMAT, backend="triton", device=tuning.CPU_DEVICE, kernel_version=VERSION,
                entries=entries)
    if default is not None:
        data["default"] = default
    data.update(meta)
    path = tuning.store_path(tuning.CPU_DEVICE)
    path.write_text(json.dumps(data))
    return path


GOOD = dict(BLOCK_H=16, BLOCK_N=16, BLOCK_D=32, BLOCK_DV=64, num_warps=1, num_stages=1, num_splits=0)


@pytest.mark.parametrize("bad", [
    dict(BLOCK_N=None), dict(BLOCK_N=1e9), dict(BLOCK_N=32.0), dict(BLOCK_N=True), dict(BLOCK_N="32"),
    dict(BLOCK_N=48), dict(BLOCK_N=0), dict(BLOCK_N=-16), dict(BLOCK_DV=1 << 20), dict(num_warps=3),
    dict(num_stages=0), dict(num_splits=-1), dict(min_per_split=2 ** 40), dict(block_n=32), [32], None,
], ids=lambda b: json.dumps(b))
def test_invalid_stored_config_is_ignored_with_one_warning(store, bad):
    """Every loaded config is checked field by field; a bad entry is skipped (the
    next layer answers) with one warning, and never reaches the kernel."""
    _, inp = _inp()
    bucket = launch.shape_bucket(inp)
    _store_file({bucket: dict(config=bad)}, default=GOOD)

    def resolve():
        for _ in range(3):
            cfg, source = launch.resolve_config(inp)
            assert source == "default" and all(cfg[k] == v for k, v in GOOD.items())
            launch.plan(inp, cfg)

    w = _count_warnings(resolve)
    assert len(w) == 1 and repr(bucket) in str(w[0].message)


def test_invalid_default_and_shipped_configs_fall_through(store, monkeypatch, tmp_path):
    _, inp = _inp()
    _store_file({}, default=dict(GOOD, BLOCK_D=None))
    w = _count_warnings(lambda: [launch.resolve_config(inp) for _ in range(2)])
    cfg, source = launch.resolve_config(inp)
    assert source == "default" and cfg == tuning.shipped_entry("triton", tuning.CPU_DEVICE)["config"]
    assert len(w) == 1 and "the default" in str(w[0].message)
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps(dict(format=1, triton=dict(devices=[dict(
        name=tuning.CPU_DEVICE, match=[], kernel_version=VERSION, config=dict(BLOCK_H=1e9))]))))
    monkeypatch.setattr(tuning, "SHIPPED_PATH", shipped)
    w = _count_warnings(lambda: [launch.resolve_config(inp) for _ in range(2)])
    assert launch.resolve_config(inp) == (tuning.FALLBACK_CONFIG, "built-in fallback")
    assert len(w) == 1 and "shipped" in str(w[0].message)


@needs_interpreter
def test_op_runs_over_a_null_stored_field(store):
    args, inp = _inp()
    _store_file({launch.shape_bucket(inp): dict(config=dict(GOOD, BLOCK_N=None))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = attention.selective_attention(**args, backend="triton")
    assert _max_err(out, oracle(args)[0]) <= TOLERANCES[torch.float32][0]


def _backups(store):
    return sorted(store.glob("*.bak-*"))


@pytest.mark.parametrize("other", [
    dict(kernel_version="fwd-0"), dict(format=99), dict(backend="cuda"),
    dict(device="cpu interpreter"),  # another device name with the same slug, hence the same file
    "not json", "[1, 2]",
], ids=str)
def test_save_moves_a_foreign_file_aside(store, other):
    """A file save_entries cannot merge into is kept as <name>.bak-<timestamp>."""
    path = tuning.store_path(tuning.CPU_DEVICE)
    if isinstance(other, str):
        path.write_text(other)
    else:
        _store_file({"mine": dict(config=dict(BLOCK_N=64), us=3.0)}, **other)
        assert tuning.slug(tuning.CPU_DEVICE) == tuning.slug("cpu interpreter")
    before = path.read_text()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tuning.save_entries("triton", tuning.CPU_DEVICE, VERSION, {"b": dict(config=dict(BLOCK_N=16))})
    (bak,) = _backups(store)
    assert bak.read_text() == before and bak.name.startswith(path.name + ".bak-")
    assert any(str(bak) in str(x.message) for x in w)
    assert json.loads(path.read_text())["entries"] == {"b": dict(config=dict(BLOCK_N=16))}
    # A second save into the now-matching file merges and makes no further copy.
    tuning.save_entries("triton", tuning.CPU_DEVICE, VERSION, {"c": dict(config=dict(BLOCK_N=32))})
    assert _backups(store) == [bak] and set(json.loads(path.read_text())["entries"]) == {"b", "c"}


def test_two_foreign_files_in_one_second_keep_both_copies(store):
    path = tuning.store_path(tuning.CPU_DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for version in ("v-a", "v-b", "v-c"):
            tuning.save_entries("triton", tuning.CPU_DEVICE, version, {version: dict(config=dict(BLOCK_N=16))})
    kept = {tuple(json.loads(b.read_text())["entries"]) for b in _backups(store)}
    assert kept == {("v-a",), ("v-b",)} and set(json.loads(path.read_text())["entries"]) == {"v-c"}


def test_lookup_rereads_a_replaced_file_of_equal_size_and_mtime(store):
    """The cache key is (inode, mtime_ns, size), not a number mixing mtime and size."""
    _, inp = _inp()
    bucket = launch.shape_bucket(inp)
    path = _store_file({bucket: dict(config=dict(GOOD, BLOCK_N=16))})
    assert launch.resolve_config(inp)[0]["BLOCK_N"] == 16
    st = path.stat()
    new = path.with_name("replacement.json")
    new.write_text(path.read_text().replace('"BLOCK_N": 16', '"BLOCK_N": 32'))
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)
    st2 = path.stat()
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns) and st2.st_ino != st.st_ino
    assert launch.resolve_config(inp)[0]["BLOCK_N"] == 32


def _writer(args):
    d, wid, n = args
    import os

    os.environ["ATTENTION_TUNING_DIR"] = d
    from attention import tuning as t

    for i in range(n):
        t.save_entries("triton", "NVIDIA H200", "fwd-1", {f"w{wid}-{i}": dict(config=dict(BLOCK_N=16 * (1 + i % 4)))})
    return wid


def test_concurrent_writers_keep_every_entry_and_never_tear_the_file(store):
    path = tuning.store_path("NVIDIA H200")
    seen_bad = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                txt = path.read_text()
            except FileNotFoundError:
                continue
            try:
                json.loads(txt)
            except ValueError:
                seen_bad.append(txt[:40])

    th = threading.Thread(target=reader)
    th.start()
    try:
        with mp.get_context("fork").Pool(4) as pool:
            assert sorted(pool.map(_writer, [(str(store), w, 15) for w in range(4)])) == [0, 1, 2, 3]
    finally:
        stop.set()
        th.join()
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 60 and not seen_bad
    assert not list(store.glob("*.tmp"))  # no temporary file left behind


def test_prune_by_shared_memory(monkeypatch):
    configs = [triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_D": c["BLOCK_D"]}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in launch.autotune_configs()]
    q = torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    monkeypatch.setattr(launch, "_max_shared_mem", lambda i: 228 * 1024)
    big = launch._prune(configs, dict(Q=q), BLOCK_H=64, BLOCK_DV=256)
    monkeypatch.setattr(launch, "_max_shared_mem", lambda i: 60 * 1024)
    small = launch._prune(configs, dict(Q=q), BLOCK_H=64, BLOCK_DV=256)
    assert 0 < len(small) < len(big) == len(configs)
    for c in small:
        d = dict(c.kwargs, num_stages=c.num_stages)
        assert launch.smem_estimate(d, 64, 256, 2) <= 60 * 1024


@needs_interpreter
def test_tune_cli_on_the_interpreter(store, capsys):
    from attention import tune

    assert tune.main(["--device", "cpu", "--preset", "tiny", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "tiny" in table and "best config" in table
    data = json.loads(tuning.store_path(tuning.CPU_DEVICE).read_text())
    (bucket, entry), = data["entries"].items()
    assert entry["measured"] is True and entry["preset"] == "tiny" and entry["configs_tried"] >= 4
    args = tune.make_inputs(tune.PRESETS["tiny"], "cpu")
    inp = attention.validate(**args)
    assert launch.shape_bucket(inp) == bucket and launch.resolve_config(inp)[1] == "tuned"


def test_backend_info_names_the_store():
    info = BACKEND.info()
    assert "tuning store" in info and "triton" in info


def test_tune_module_entry_point_selects_the_interpreter(tmp_path):
    """`python -m attention.tune --device cpu` in a fresh process: `attention` is imported before the
    CLI can set TRITON_INTERPRET, so the backend must not import triton at package import time."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ATTENTION_TUNING_DIR=str(tmp_path), PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-m", "attention.tune", "--device", "cpu", "--preset", "tiny", "--repeats",
                        "1", "--no-save"], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tiny" in r.stdout and "best config" in r.stdout
    assert not list(tmp_path.glob("*.json"))  # --no-save
