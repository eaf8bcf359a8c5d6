# The two commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

# GPU = auto | 0 | 1: whether .venv gets TensorFlow's CUDA libraries.
# The plain tensorflow wheel carries none, so on an NVIDIA machine TensorFlow
# would silently train on the CPU; `tensorflow[and-cuda]` (the `gpu` extra)
# brings them, several GB that a CPU-only machine has no use for.
# auto: the first install takes the gpu extra when `nvidia-smi -L` succeeds
# and lists at least one line starting with "GPU " (a working NVIDIA driver
# with a GPU); after that the installed choice, recorded in the stamp's name,
# is kept, so that `make test` never undoes an explicit `make venv GPU=0`.
# 0 / 1 choose explicitly; a different choice than the installed one reinstalls.
GPU ?= auto
INSTALLED := $(patsubst $(VENV)/.installed-gpu%,%,$(firstword $(wildcard $(VENV)/.installed-gpu[01])))
ifeq ($(GPU),auto)
ifneq ($(INSTALLED),)
GPU_CHOICE := $(INSTALLED)
else
# `timeout` where there is one: a wedged driver can make nvidia-smi hang.
GPU_CHOICE := $(shell t=$$(command -v timeout >/dev/null 2>&1 && echo "timeout 60"); \
	out=$$($$t nvidia-smi -L 2>/dev/null) && printf '%s\n' "$$out" | grep -q '^GPU ' && echo 1 || echo 0)
endif
else ifeq ($(GPU),0)
GPU_CHOICE := 0
else ifeq ($(GPU),1)
GPU_CHOICE := 1
else
$(error GPU must be auto, 0 or 1, got '$(GPU)')
endif
comma := ,
EXTRAS := $(if $(filter 1,$(GPU_CHOICE)),test$(comma)lint$(comma)gpu,test$(comma)lint)
STAMP := $(VENV)/.installed-gpu$(GPU_CHOICE)

.PHONY: venv train test test-isa test-fast lint format test-gpu gpu-check bench profile clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@# The tensorflow wheel depends on keras and imports it at start-up when it
	@# is installed; tfgpt uses none of it, so the environment goes without.
	$(PY) -m pip uninstall --quiet --yes keras
	@# pip leaves packages no longer asked for in place: going from GPU=1 to 0
	@# keeps the CUDA libraries (and TensorFlow keeps using the GPU).
	@if [ $(GPU_CHOICE) = 0 ] && [ -e $(VENV)/.installed-gpu1 ]; then \
		echo "note: the CUDA libraries of GPU=1 stay installed; for a CPU-only .venv run: make clean venv GPU=0"; fi
	rm -f $(VENV)/.installed $(VENV)/.installed-gpu0 $(VENV)/.installed-gpu1
	touch $@

train: venv
	$(PY) train.py $(ARGS)

# The CPU suite (GPU tests deselected; tests/conftest.py hides any GPU), with
# the ten slowest tests listed. JOBS pytest-xdist worker processes run the
# tests side by side (much of a test's time, TensorFlow's start-up and
# tracing, uses one core; each worker holds several GB), each test file in one
# worker, so that a file's shared runs and exports are made once. JOBS=0 runs
# the tests in this process, one at a time.
JOBS ?= 2
# 1 on a CPU with AVX-512 (see ISA_RUNS below).
AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo 1)
test: venv
	$(PY) -m pytest -q -m "not gpu" -n $(JOBS) --dist loadfile --durations=10 $(ARGS)
ifeq ($(AVX512)$(ARGS),1)
	$(ISA_RUNS)
endif

# The tests whose figures depend on the CPU's kernels (marker `kernels`: a row
# alone and in a batch, bit for bit or within a bound: docs/serving.md), run again as a CPU
# without AVX-512 runs them: with oneDNN's AVX2 kernels
# (ONEDNN_MAX_CPU_ISA=AVX2), then with Eigen (TF_ENABLE_ONEDNN_OPTS=0), which
# is where an AVX2 CPU sends bfloat16 products (under the AVX2 cap TensorFlow
# would still send them to oneDNN, which aborts: tests/conftest.py skips
# them there). A whole `make test` (no ARGS) on an AVX-512 machine adds
# these runs, so that CI on either kind of CPU covers both.
define ISA_RUNS
ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -m "kernels and not gpu" -n $(JOBS) --dist loadfile
	TF_ENABLE_ONEDNN_OPTS=0 $(PY) -m pytest -q -m "kernels and not gpu" -n $(JOBS) --dist loadfile
endef
test-isa: venv
	$(ISA_RUNS)

# The same without the `slow` tests (end-to-end runs and subprocesses).
test-fast: venv
	$(PY) -m pytest -q -m "not gpu and not slow" -n $(JOBS) --dist loadfile --durations=10 $(ARGS)

# ruff's checks and its formatting check (settings in pyproject.toml); CI runs
# this before the tests. `make format` rewrites the files instead.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The GPU tests alone, with the GPUs visible (needs a GPU and GPU=1).
test-gpu: venv
	TFGPT_TEST_GPU=1 $(PY) -m pytest -q -m gpu tests/test_gpu.py $(ARGS)

# A few minutes on a GPU machine: the device, training and sampler speed per
# precision and XLA setting, then the GPU tests.
gpu-check: venv
	$(PY) -m benchmarks.gpu_check $(ARGS)

bench: venv
	$(PY) -m benchmarks.bench $(ARGS)

# Where a training step's time goes, per op class (ARGS="--precision bfloat16").
profile: venv
	$(PY) -m benchmarks.profile_step $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
