# Two commands for a new user on a fresh machine with only Python and pip:
#   make demo   - venv + install + the DeepSeek-shaped CPU benchmark with its result table
#   make test   - venv + install + the whole test suite
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0
# transformers is test-only (the Hugging Face integration tests)
TRANSFORMERS_VERSION ?= 5.24.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
NVCC ?= $(shell command -v nvcc 2>/dev/null)

.PHONY: all venv install test demo bench info verify cuda-check gpu-check ascendc-check clean compile-budget \
	compile-budget-triton36 triton36 triton-ascend-check

all: test

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Installed once per venv; re-run when the build description changes.
$(VENV)/.installed: $(VENV)/bin/activate setup.py pyproject.toml build_ext_config.py
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q "triton==$(TRITON_VERSION)" numpy pybind11 setuptools wheel pytest hypothesis matplotlib tqdm "transformers==$(TRANSFORMERS_VERSION)"
	$(PIP) install -q --no-build-isolation -e .
	touch $@

venv install: $(VENV)/.installed

test: install
	@if [ -n "$(NVCC)" ] && [ -d csrc/cuda ] && ls csrc/cuda/*.cu >/dev/null 2>&1; then $(MAKE) cuda-check; else echo "cuda-check: skipped (no nvcc or no CUDA sources)"; fi
	@$(MAKE) --no-print-directory triton-ascend-check
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m bench --preset dsv32-decode

info: install
	$(PY) -m attention.info

# The cross-chip proof on this machine: every backend available here x every feature x dtype.
verify: install
	$(PY) -m attention.verify --device cpu --out out/verify

# Type-check the AscendC device files against Huawei's open headers with ascendc-check, a checker kept
# outside this repository (ASCENDC_CHECK: its check.sh), and an asc-devkit checkout at ASC_DEVKIT_DIR.
# The defaults are the development machine's layout; elsewhere set both. Not part of `make test`: CI
# cannot fetch either.
ASC_DEVKIT_DIR ?= /tmp/asc-devkit
ASCENDC_CHECK ?= ../shared/ascendc-check/check.sh
ascendc-check:
	ASC_DEVKIT_DIR=$(ASC_DEVKIT_DIR) $(ASCENDC_CHECK) csrc/ascend/kernel/*.cpp

# On a GPU machine whose Python already has torch and triton (see bench/gpu_check.sh).
gpu-check:
	bash bench/gpu_check.sh

# Compile every CUDA source for sm_80 and sm_90 with nvcc; any error or warning fails.
# Needs only nvcc (no GPU, no torch): kernels are raw-pointer .cu/.cuh files.
# The objects are thrown away: each goes to a scratch file in /tmp, removed at the end.
CUDA_CHECK_FLAGS ?= -std=c++17 -O2 --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
cuda-check:
	@test -n "$(NVCC)" || { echo "cuda-check: nvcc not found"; exit 1; }
	@set -e; for f in csrc/cuda/*.cu; do [ -e "$$f" ] || continue; \
	  case "$$f" in *_binding.cu|*binding*) continue;; esac; \
	  for arch in 80 90; do \
	    echo "nvcc sm_$$arch $$f"; \
	    $(NVCC) $(CUDA_CHECK_FLAGS) -gencode arch=compute_$$arch,code=sm_$$arch -c "$$f" -o /tmp/cuda_check_$$$$.o; \
	  done; done; rm -f /tmp/cuda_check_*.o; echo "cuda-check: ok"

# Compile budgets of the Triton kernels (registers, spills, shared memory) with the JIT's real
# specialization, for sm_90, without a GPU (bench/compile_budget.py). compile-budget uses the venv's
# (CI's) triton; compile-budget-triton36 the GPU machine's triton 3.6, installed beside the venv into
# $(TRITON36_DIR) (pip --target, no torch: triton.compile needs none) and put first on PYTHONPATH.
# Neither depends on `install`, so an existing venv is used as it is: make ... VENV=/path/to/venv.
TRITON36_DIR ?= .triton36
BUDGET_ARGS ?=
$(TRITON36_DIR)/.installed:
	$(PIP) install -q --no-deps --target $(TRITON36_DIR) "triton==3.6.0"
	touch $@
triton36: $(TRITON36_DIR)/.installed
compile-budget:
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(PY) bench/compile_budget.py $(BUDGET_ARGS)
compile-budget-triton36: $(TRITON36_DIR)/.installed
	env -u TRITON_INTERPRET PYTHONPATH=$(abspath $(TRITON36_DIR)):$(CURDIR) $(PY) bench/compile_budget.py $(BUDGET_ARGS)

# Our Triton kernels compiled for Ascend (triton-ascend + bishengir-compile) to the end of memory planning,
# for Ascend910B2/B4/910_9391, in its own venv (triton-ascend replaces triton); no NPU or CANN needed, and
# nothing runs. Says SKIPPED (exit 0) when the packages cannot be installed; docs/triton.md "Ascend".
TA_VENV ?= .venv-triton-ascend
TA_ARGS ?=
triton-ascend-check:
	TA_VENV=$(TA_VENV) TA_ARGS="$(TA_ARGS)" PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) bash bench/triton_ascend_check.sh

clean:
	rm -rf $(VENV) build *.egg-info $(TRITON36_DIR) $(TA_VENV)
