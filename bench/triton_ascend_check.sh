#!/usr/bin/env bash
# make triton-ascend-check: build a separate environment with Huawei's triton-ascend (it replaces the
# `triton` package, so it can never share the main venv) and compile every Triton kernel of the package
# for Ascend910B2 / Ascend910B4 / Ascend910_9391 to the end of memory planning (bench/triton_ascend_check.py).
#
# Exit status: the check's (1 on any compile error, UB/L1 overflow or scalar gather). When the packages
# cannot be installed (no PyPI access, no wheel for this platform or Python), it says SKIPPED and exits 0,
# so `make test` does not fail on such a machine; TRITON_ASCEND_REQUIRED=1 turns that skip into a failure.
#
# Wheels are cached in $TA_WHEELS: a second build installs from disk (no download).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TA_VENV=${TA_VENV:-.venv-triton-ascend}
TA_WHEELS=${TA_WHEELS:-.whl-triton-ascend}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# triton-ascend 3.2 imports pybind11 at import time without declaring it; numpy silences torch's warning.
TA_PACKAGES=${TA_PACKAGES:-"triton-ascend==3.2.0 ascendnpu-ir==1.2.0 pybind11 numpy"}
TA_ARGS=${TA_ARGS:-}

skip() {
  echo "triton-ascend-check: SKIPPED ($1)"
  if [ "${TRITON_ASCEND_REQUIRED:-0}" = "1" ]; then exit 1; fi
  exit 0
}

start=$(date +%s)
if [ ! -f "$TA_VENV/.installed" ]; then
  rm -rf "$TA_VENV"
  "$PYTHON" -m venv "$TA_VENV" || skip "could not create $TA_VENV"
  mkdir -p "$TA_WHEELS"
  # Download into the cache (a no-op for wheels already there), then install from the cache only.
  # torch comes from the ordinary index: the CPU build (a local file on our machines) is enough.
  "$TA_VENV/bin/pip" download -q -d "$TA_WHEELS" $TA_PACKAGES >/dev/null 2>&1 \
    || echo "triton-ascend-check: download failed; trying the wheel cache $TA_WHEELS alone"
  "$TA_VENV/bin/pip" install -q --no-index --find-links "$TA_WHEELS" $TA_PACKAGES >/dev/null 2>&1 \
    || skip "pip could not install $TA_PACKAGES (no PyPI access or no wheel for this platform)"
  "$TA_VENV/bin/pip" install -q "torch==$TORCH_VERSION" >/dev/null 2>&1 \
    || skip "pip could not install torch==$TORCH_VERSION"
  touch "$TA_VENV/.installed"
  echo "triton-ascend-check: environment $TA_VENV built in $(( $(date +%s) - start )) s," \
       "$(du -sm "$TA_VENV" | cut -f1) MB (wheel cache $(du -sm "$TA_WHEELS" | cut -f1) MB)"
fi
"$TA_VENV/bin/python" -c "import importlib.metadata as m; m.version('triton-ascend'); import triton, ascendnpuir" \
  2>/dev/null || skip "$TA_VENV does not import triton-ascend"
env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$TA_VENV/bin/python" bench/triton_ascend_check.py $TA_ARGS
rc=$?
echo "triton-ascend-check: exit $rc after $(( $(date +%s) - start )) s"
exit $rc
