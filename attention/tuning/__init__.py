"""Tuned-config store (docs/style.md rule 8: tuning is data).

Two layers, both JSON:

* **Shipped defaults** (``attention/tuning/triton_defaults.json``, package data): one default config
  per known device family, matched by a substring of ``torch.cuda.get_device_name()``, plus the CPU
  interpreter entry. Each says whether it was measured or is an estimate.
* **The user store**, one file per (backend, device): ``$ATTENTION_TUNING_DIR/<backend>-<device>.json``
  (default ``~/.cache/attention/tuning``), written by ``python -m attention.tune``. Entries are keyed
  by shape bucket; the file records the device name, backend and kernel version it was measured
  with, and a file whose metadata does not match, or that does not parse, is ignored with one
  warning (Triton's own cache keys by architecture, not by model: an A100 config is not an H200's).
Every config read (user entries, user default, shipped defaults) is checked field by field by
:func:`config_problems` (known key, int type, power of two, range); an invalid one is skipped with one
warning and the lookup falls through to the next layer: a bad file can never make the op raise.

Writers take an advisory lock, re-read, merge, write a temporary file in the same folder and
``os.replace`` it: a reader sees the old or the new file, never half of one, and two concurrent
``tune`` runs keep each other's entries. A file that cannot be merged into (unreadable, or written
for another format, backend, device or kernel version, e.g. a device whose name has the same slug)
is never overwritten in place: it is first moved aside as ``<name>.bak-<UTC timestamp>``, with a
warning naming the copy, so nothing a user measured is lost.

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

# Field rules of a stored config: (allowed range, power of two required). Block sizes feed
# tl.arange/tl.dot (powers of two, >= 16); num_warps is a power of two up to a 1024-thread block;
# the split/occupancy knobs are counts that plan() clamps further. Anything else is a typo or a
# config of another kernel, and is refused rather than silently ignored.
CONFIG_FIELDS: Dict[str, Tuple[Tuple[int, int], bool]] = {
    "BLOCK_H": ((16, 1024), True), "BLOCK_N": ((16, 1024), True), "BLOCK_D": ((16, 1024), True),
    "BLOCK_DV": ((16, 1024), True), "num_warps": ((1, 32), True), "num_stages": ((1, 8), False),
    # The latent kernel's candidate tile when it differs from the general kernel's BLOCK_N (its
    # 64 x 512 float32 accumulator leaves fewer registers for the tile; docs/triton.md).
    "LATENT_BLOCK_N": ((16, 1024), True),
    # The latent kernel's tile over a quantized cache (fp8 / int8): the dequantized tile sits in registers
    # beside that accumulator, and 32-row tiles spill on sm_90 where 16-row ones do not (docs/triton.md).
    "QUANT_LATENT_BLOCK_N": ((16, 1024), True),
    "num_splits": ((0, 1024), False), "target_programs": ((0, 1 << 20), False),
    "min_per_split": ((0, 1 << 24), False),
    # The general kernel's rope chunk (default: BLOCK_D) and its key-gather shape (1: rows, transposed
    # on chip; what triton-ascend turns into row copies, docs/triton.md "Ascend"); 0 on NVIDIA.
    "BLOCK_DR": ((16, 1024), True), "GATHER_ROWS": ((0, 1), False),
    # Indices per step of the latent kernel's kept-end pass (default launch.KEPT_CHUNK): int64 vectors
    # of this length sit in Ascend's UB beside the tile (docs/triton.md "Ascend").
    "KEPT_CHUNK": ((16, 4096), True),
    # The fused select's merge (1: (score, position) pairs through our own bitonic network, for
    # triton-ascend, whose tl.sort cannot sort int64 keys; 0: tl.sort of packed int64 keys, NVIDIA).
    "SELECT_PAIR_SORT": ((0, 1), False),
    # The fused select's score tile (positions per tile, default 64): Ascend's UB holds 32 beside the
    # pair network at k = 2048.
    "SELECT_BLOCK_N": ((16, 1024), True),
}

_warned: set = set()
# path -> ((st_dev, st_ino, st_mtime_ns, st_size), parsed file or None)
_cache: Dict[str, Tuple[Tuple[int, int, int, int], Optional[dict]]] = {}


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
    """Parsed file, cached by its identity (a lookup runs on every call: one stat, no parse).

    The key is the whole (device, inode, mtime_ns, size) tuple: a file replaced by another (a new
    inode, as every writer's ``os.replace`` makes) is re-read even when size and mtime are equal,
    and no two different stamps can collide the way a combined number could.
    """
    try:
        st = path.stat()
    except OSError:
        _cache.pop(str(path), None)
        return None
    stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
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


def config_problems(cfg) -> list:
    """What is wrong with a stored config (empty list: valid). A partial config is valid: missing
    fields come from ``FALLBACK_CONFIG``."""
    if not isinstance(cfg, dict):
        return [f"config is {type(cfg).__name__}, not an object"]
    bad = []
    for key, val in cfg.items():
        rule = CONFIG_FIELDS.get(key)
        if rule is None:
            bad.append(f"unknown field {key!r}")
            continue
        (lo, hi), pow2 = rule
        # bool is an int subclass, and 1e9 / 32.0 are floats: a config field is a plain JSON integer.
        if type(val) is not int:
            bad.append(f"{key}={val!r} is not an integer")
        elif not lo <= val <= hi:
            bad.append(f"{key}={val} is outside [{lo}, {hi}]")
        elif pow2 and val & (val - 1):
            bad.append(f"{key}={val} is not a power of two")
    return bad


def _checked(cfg, where: str, path: Path) -> Optional[dict]:
    """A copy of ``cfg`` when valid; else None, with one warning per (file, place, content)."""
    bad = config_problems(cfg)
    if not bad:
        return dict(cfg)
    _warn_once(("invalid", str(path), where, json.dumps(cfg, sort_keys=True, default=str)),
               f"attention: ignoring {where} in tuning file {path}: {'; '.join(bad)}")
    return None


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
        if ent is not None:
            cfg = _checked(ent.get("config") if isinstance(ent, dict) else ent, f"entry {bucket!r}", path)
            if cfg is not None:
                return cfg, "tuned"
        if data.get("default") is not None:
            cfg = _checked(data["default"], "the default", path)
            if cfg is not None:
                return cfg, "default"
    rec = shipped_entry(backend, device)
    if rec is not None and rec.get("kernel_version") == version:
        cfg = _checked(rec.get("config"), f"the shipped default of {rec.get('name')!r}", SHIPPED_PATH)
        if cfg is not None:
            return cfg, "default"
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


def _move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``<name>.bak-<UTC timestamp>[-n]`` (never over an existing copy) and say so."""
    stem = f"{path.name}.bak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 0
    while True:
        bak = path.with_name(stem if n == 0 else f"{stem}-{n}")
        try:
            # link + unlink instead of rename: rename would silently replace a copy of the same second.
            os.link(path, bak)
        except FileExistsError:
            n += 1
            continue
        except OSError:  # no hard links on this filesystem; we hold the store's lock, so check then rename
            if bak.exists():
                n += 1
                continue
            os.rename(path, bak)
            break
        os.unlink(path)
        break
    warnings.warn(f"attention: tuning file {path} {why}; it was moved to {bak} (nothing in it was deleted) and "
                  f"a new file is written in its place", RuntimeWarning, stacklevel=3)
    return bak


def save_entries(backend: str, device: str, version: str, entries: Dict[str, dict],
                 default: Optional[Dict] = None, path: Optional[Path] = None) -> Path:
    """Merge ``{bucket: {"config": {...}, ...metrics}}`` into the user store, atomically.

    A file this run cannot merge into (unparsable, or written for another format, backend, device or
    kernel version) is moved aside first (:func:`_move_aside`), never overwritten.
    """
    path = Path(path) if path is not None else store_path(device, backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():  # not a store file someone measured: refuse rather than move a folder aside
        raise IsADirectoryError(f"tuning store path {path} is a directory")
    with _locked(path):
        old: dict = {}
        why = None
        try:
            old = json.loads(path.read_text())
        except FileNotFoundError:
            old = {}
        except (OSError, ValueError) as e:
            why, old = f"could not be read ({type(e).__name__}: {e})", {}
        else:
            want = dict(format=FORMAT, backend=backend, device=device, kernel_version=version)
            if not isinstance(old, dict):
                why, old = "does not hold a JSON object", {}
            else:
                other = {k: old.get(k) for k, v in want.items() if old.get(k) != v}
                if other:
                    why, old = f"was written for {other}, not {({k: want[k] for k in other})}", {}
                elif not isinstance(old.get("entries", {}), dict) or not isinstance(old.get("default", {}), dict):
                    why, old = "has an 'entries' or 'default' field that is not an object", {}
        if why is not None:
            _move_aside(path, why)
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
