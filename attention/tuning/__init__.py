"""Tuned-config store (STYLE.md rule 8: tuning is data).

Two layers, both JSON:

* **Shipped defaults** (``attention/tuning/triton_defaults.json``, package data): one default config
  per known device family, matched by a substring of ``torch.cuda.get_device_name()``, plus the CPU
  interpreter entry. Each says whether it was measured or is an estimate.
* **The user store**, one file per (backend, device): ``$ATTENTION_TUNING_DIR/<backend>-<device>.json``
  (default ``~/.cache/attention/tuning``), written by ``python -m attention.tune``. Entries are keyed
  by shape bucket; the file records the device name, backend and kernel version it was measured
  with, and a file whose metadata does not match, or that does not parse, is ignored with one
  warning (Triton's own cache keys by architecture, not by model: an A100 config is not an H200's).

Writers take an advisory lock, re-read, merge, write a temporary file in the same folder and
``os.replace`` it: a reader sees the old or the new file, never half of one, and two concurrent
``tune`` runs keep each other's entries.

Lookup order for (backend, device, kernel version, bucket): user store exact bucket ("tuned") ->
user store default -> shipped device default ("default") -> None (the caller's built-in fallback).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

FORMAT = 1
CPU_DEVICE = "cpu-interpreter"
SHIPPED_PATH = Path(__file__).with_name("triton_defaults.json")

# Used when neither the store nor the shipped file has anything for the device.
FALLBACK_CONFIG: Dict = dict(BLOCK_H=64, BLOCK_N=32, BLOCK_D=64, BLOCK_DV=512, num_warps=4, num_stages=2,
                             num_splits=0)

_warned: set = set()
_cache: Dict[str, Tuple[int, Optional[dict]]] = {}


def _warn_once(key, msg: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def store_dir() -> Path:
    d = os.environ.get("ATTENTION_TUNING_DIR")
    return Path(d) if d else Path.home() / ".cache" / "attention" / "tuning"


def store_path(device: Optional[str] = None, backend: str = "triton") -> Path:
    if device is None:
        device = current_device_name()
    return store_dir() / f"{backend}-{slug(device)}.json"


def current_device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return CPU_DEVICE


def _read_json(path: Path) -> Optional[dict]:
    """Parsed file, cached by mtime (a lookup runs on every call: one stat, no parse)."""
    try:
        st = path.stat()
    except OSError:
        _cache.pop(str(path), None)
        return None
    stamp = st.st_mtime_ns ^ st.st_size
    hit = _cache.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
    except Exception as e:
        _warn_once(("corrupt", str(path), stamp), f"attention: ignoring unreadable tuning file {path}: {e}")
        data = None
    _cache[str(path)] = (stamp, data)
    return data


def _valid_user_file(data: Optional[dict], path: Path, backend: str, device: str, version: str) -> bool:
    if data is None:
        return False
    want = {"format": FORMAT, "backend": backend, "device": device, "kernel_version": version}
    bad = {k: data.get(k) for k, v in want.items() if data.get(k) != v}
    if bad or not isinstance(data.get("entries", {}), dict):
        _warn_once(("stale", str(path), json.dumps(bad, sort_keys=True, default=str)),
                   f"attention: ignoring tuning file {path}: it was written for {bad}, "
                   f"this run needs {({k: want[k] for k in bad})}")
        return False
    return True


def shipped_entry(backend: str, device: str) -> Optional[dict]:
    """The shipped record of the device family ``device`` belongs to (first substring match)."""
    data = _read_json(SHIPPED_PATH) or {}
    for rec in data.get(backend, {}).get("devices", []):
        if any(m.lower() in device.lower() for m in rec.get("match", [])) or rec.get("name") == device:
            return rec
    return None


def lookup(backend: str, device: str, version: str, bucket: str) -> Optional[Tuple[Dict, str]]:
    """(config, source) with source "tuned" | "default"; None when nothing is known."""
    path = store_path(device, backend)
    data = _read_json(path)
    if _valid_user_file(data, path, backend, device, version):
        ent = data.get("entries", {}).get(bucket)
        if isinstance(ent, dict) and isinstance(ent.get("config"), dict):
            return dict(ent["config"]), "tuned"
        if isinstance(data.get("default"), dict):
            return dict(data["default"]), "default"
    rec = shipped_entry(backend, device)
    if rec is not None and rec.get("kernel_version") == version:
        return dict(rec["config"]), "default"
    return None


@contextlib.contextmanager
def _locked(path: Path):
    """Advisory lock beside the store (POSIX); the atomic replace alone already prevents torn files."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: atomic replace only
        yield
        return
    lock = path.with_suffix(path.suffix + ".lock")
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def save_entries(backend: str, device: str, version: str, entries: Dict[str, dict],
                 default: Optional[Dict] = None, path: Optional[Path] = None) -> Path:
    """Merge ``{bucket: {"config": {...}, ...metrics}}`` into the user store, atomically."""
    path = Path(path) if path is not None else store_path(device, backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            old = json.loads(path.read_text())
            if not (isinstance(old, dict) and old.get("format") == FORMAT and old.get("device") == device
                    and old.get("backend") == backend and old.get("kernel_version") == version):
                old = {}
        except Exception:
            old = {}  # missing, corrupt or stale: start afresh (the warning is the reader's job)
        merged = dict(format=FORMAT, backend=backend, device=device, kernel_version=version,
                      updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      entries=dict(old.get("entries", {}) if isinstance(old.get("entries"), dict) else {}))
        if default is not None:
            merged["default"] = default
        elif isinstance(old.get("default"), dict):
            merged["default"] = old["default"]
        merged["entries"].update(entries)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(merged, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    _cache.pop(str(path), None)
    return path
