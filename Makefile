# `make quickstart` and `make test` set everything up on a fresh machine in a virtualenv in .venv.
# The tests need torch: 2.13.0 is installed first, a CPU build from this machine kind's local
# wheel store (an unpinned torch would pull a multi-GB CUDA build; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), then mpt_jax with its test extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUNTIME_STAMP := $(VENV)/.runtime-stamp

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(MAKE) aot-plugin nvidia-tools mds-writer VENV=$(VENV)
	touch $(STAMP)

# jax's CUDA PJRT plugin for `bench_train.py --aot` (compiling for a GPU on a host without one),
# matched to the venv's jaxlib; in a folder of its own, off the path of everything else (jax
# would try to open a GPU with it)
aot-plugin:
	$(VENV)/bin/python -m pip install -q --no-deps --upgrade --target $(VENV)/aot-plugin \
		$$($(VENV)/bin/python -c 'from mpt_jax.aot import plugin_packages; print(plugin_packages())')

# NVIDIA's cuobjdump and nvdisasm (CPU programs) for tools/kernel_sass.py, also in a folder of
# their own: installed beside jax they would make it take their folder for CUDA's
nvidia-tools:
	$(VENV)/bin/python -m pip install -q --no-deps --upgrade --target $(VENV)/nvidia-tools \
		$$($(VENV)/bin/python -c 'from mpt_jax.sass import TOOL_PACKAGES; print(TOOL_PACKAGES)')

# MosaicML streaming's MDSWriter, which the MDS tests write their shards with (tests/mds_writer.py
# loads it), and python-zstd for its zstd; without dependencies, which would pin transformers<5
# and pull torchvision, and in a folder of its own, off the venv's path
mds-writer:
	$(VENV)/bin/python -m pip install -q --no-deps --upgrade --target $(VENV)/mds-writer \
		mosaicml-streaming==0.13.0 zstd==1.5.7.2

.PHONY: setup quickstart test test-all test-gpu-stack lint format aot-plugin nvidia-tools mds-writer
setup: $(STAMP)

# the main job: prepare the built-in corpus (once), train experiments/quickstart.yaml, export to HF
quickstart: $(RUNTIME_STAMP)
	$(BIN)/mpt-jax train experiments/quickstart.yaml --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 -q --durations=15

# the suite plus the tests marked slow (GPU compiles for an H200 through the AOT plugin, the
# SASS reads, the Hopper tuning sweep's lowering): 8 tests
test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q --run-slow --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The CPU suite under the GPU image's stack (Python 3.12, jax 0.11.2, flax 0.12.10, optax 0.2.8,
# tokamax 0.0.12; no torch, so the transformers parity tests skip): API drift between jax 0.10
# and 0.11 shows here, before device time is spent. Needs a python3.12 (PYTHON312=...).
PYTHON312 ?= python3.12
GPU_STACK_VENV ?= .venv-gpu-stack
test-gpu-stack:
	$(PYTHON312) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_VENV)/bin/python -m pip install -q jax==0.11.2 jaxlib==0.11.2 flax==0.12.10 \
		optax==0.2.8 tokamax==0.0.12 typeguard==2.13.3 pytest pytest-xdist matplotlib omegaconf -e .
	$(MAKE) aot-plugin nvidia-tools VENV=$(GPU_STACK_VENV)
	$(GPU_STACK_VENV)/bin/python -m pytest -n 2 -q -p no:cacheprovider --run-slow --durations=5
