#!/bin/bash
# Device check for the ascendc backend, for a user with an Ascend A2/A3 machine (910B / 910C).
# NEVER RUN BY ITS AUTHORS: no NPU and no CANN toolkit were available. Expect to fix things here first.
#
#   source /usr/local/Ascend/ascend-toolkit/set_env.sh   # CANN: sets ASCEND_HOME_PATH, puts bisheng on PATH
#   pip install torch==<your torch> torch_npu==<matching>
#   bash bench/npu_check.sh
#
# Steps: 1. build both extensions (the CPU twin and, with CANN, the NPU kernel via bisheng);
#        2. the CPU twin's tests (the same kernel source on the CPU, every SoC's capacities);
#        3. the equivalence matrix on npu (tests/test_equivalence.py, ids ascendc-npu-*);
#        4. benchmark against torch_npu.npu_sparse_flash_attention on the same inputs (bench/npu_bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

[ -n "${ASCEND_HOME_PATH:-}" ] || { echo "npu_check: ASCEND_HOME_PATH is not set; source CANN's set_env.sh" >&2; exit 2; }
command -v bisheng >/dev/null || [ -x "$ASCEND_HOME_PATH/compiler/ccec_compiler/bin/bisheng" ] \
  || { echo "npu_check: bisheng not found under $ASCEND_HOME_PATH" >&2; exit 2; }
$PY -c "import torch, torch_npu; assert torch.npu.is_available(), 'no NPU visible'; print('npu:', torch.npu.get_device_name())"

# How the NPU extension is linked (what `pip install -e .` runs through csrc/ascend/build_ext.py), as
# Huawei's torch/pybind samples do it: bisheng is the compiler and link driver for the .asc source and
# produces a shared library holding the device binary and the <<<>>> launch stubs; the torch_npu binding
# is a plain host C++ file linked against it. By hand:
#
#   mkdir -p build/ascend
#   bisheng -x asc --npu-arch=dav-2201 -O2 -std=c++17 -fPIC -shared csrc/ascend/npu/launch.asc \
#       -Icsrc/ascend/kernel -o build/ascend/libselattn_npu_kernel.so
#   g++ -O2 -std=c++20 -fPIC -shared csrc/ascend/npu/npu_binding.cpp csrc/ascend/host/tiling.cpp \
#       -Icsrc/ascend -Icsrc/ascend/kernel -Icsrc/ascend/host -I$ASCEND_HOME_PATH/include \
#       $(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))") \
#       -I$(python3 -c "import torch_npu, os; print(os.path.dirname(torch_npu.__file__))")/include \
#       $(python3 -m pybind11 --includes) -DTORCH_EXTENSION_NAME=_ascendc_npu \
#       -Lbuild/ascend -Wl,-rpath,$PWD/build/ascend -lselattn_npu_kernel \
#       -L$ASCEND_HOME_PATH/lib64 -lascendcl -lruntime -lplatform -ltiling_api \
#       -L$(python3 -c "import torch_npu, os; print(os.path.dirname(torch_npu.__file__))")/lib -ltorch_npu \
#       -o attention/_ascendc_npu$(python3-config --extension-suffix)
#
# If bisheng rejects -shared for an .asc source on your CANN version, use it as the link driver of the
# whole extension instead (Huawei's pybind sample: both files compiled and linked by bisheng with
# --gcc-toolchain=<the g++ root that built torch>).

echo "== 1/4 build (CPU twin + NPU kernel)"
$PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -5
$PY -c "import attention._ascendc_npu as m; print('NPU extension built; device reports', m.device_soc())"
$PY -m attention.info | sed -n '/\[ascendc\]/,$p'

echo "== 2/4 CPU twin tests"
ATTENTION_NAN_FILL=1 $PY -m pytest -q tests/test_ascendc*.py

echo "== 3/4 equivalence matrix on npu"
ATTENTION_NAN_FILL=1 ATTENTION_DEBUG=1 $PY -m pytest -q tests/test_equivalence.py -k "ascendc-npu"

echo "== 4/4 benchmark vs torch_npu.npu_sparse_flash_attention"
$PY -m bench.npu_bench --dtype bfloat16
