# Every target works on a fresh machine: `setup` makes .venv with a CPU build of torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where this workplace keeps the CPU wheel of torch; named explicitly so that a shell
# without the machine's pip settings (PIP_FIND_LINKS) still finds it.
TORCH_WHEELS ?= /opt/wheels
TORCH_SOURCE := $(if $(wildcard $(TORCH_WHEELS)/torch-*),--find-links $(TORCH_WHEELS))

# The oldest transformers and Triton pyproject allows (their `>=` bounds; Triton 3.6 is what
# torch 2.11 installs): in a venv of their own, the Hugging Face tests (marker `hf`), the
# tests that run every kernel family under that Triton's interpreter (the fp64 training and
# gradient paths, the GPU suite's smoke run against the golden), and the compile check of the
# tiles chosen by Triton version (sm_90 / sm_100: no spill inside a hot loop).
TRANSFORMERS_OLDEST := $(shell sed -n 's/^hf = \["transformers>=\([0-9.]*\)"\]/\1/p' pyproject.toml)
TRITON_OLDEST := $(shell sed -n 's/^ *"triton>=\([0-9.]*\)",*$$/\1/p' pyproject.toml)
OLDEST_VENV := .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed-transformers-$(TRANSFORMERS_OLDEST)-triton-$(TRITON_OLDEST)
OLDEST_KERNEL_TESTS := tests/test_training.py tests/test_runtime_checks.py tests/test_oldest_triton_compile.py \
	tests/test_bench.py::test_suite_smoke_writes_the_json_schema

.PHONY: setup demo test test-newest test-oldest lint format generate bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on local disk. A bare `torch` requirement would pull a CUDA build.
	$(PY) -m pip install -q $(TORCH_SOURCE) torch==2.13.0
	$(PY) -m pip install -q $(TORCH_SOURCE) -e '.[test]'
	$(PY) -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
	touch $(STAMP)

setup: $(STAMP)

$(OLDEST_STAMP): pyproject.toml
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q $(TORCH_SOURCE) torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install -q $(TORCH_SOURCE) -e '.[test]' \
		'transformers==$(TRANSFORMERS_OLDEST)' 'triton==$(TRITON_OLDEST)'
	touch $(OLDEST_STAMP)

# The main job: generate DeepSeek-V3's kernels and module, run them on CPU under the
# Triton interpreter, compare with the fp64 reference, print the KV-cache bytes per token.
demo: setup
	$(PY) -m mlagen run specs/deepseek_v3.yaml --batch 1 --seq 32

# The whole suite with the newest releases pyproject allows (what a fresh venv gets), then the
# Hugging Face tests and the kernels' interpreter tests with the oldest transformers and Triton
# allowed, each in one pytest-xdist worker per core, whole test files at a time. About 25 + 3
# minutes on 2 cores, compile caches cold, 29:49 with both venvs built in a fresh clone
# (2026-12-03; CI's machine took about two thirds of this machine's time before; its limit is 30).
test: test-newest test-oldest

test-newest: setup
	$(PY) -c "import transformers; print('tests with transformers', transformers.__version__)"
	$(PY) -m pytest -q -n auto --dist loadfile --durations=5

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -c "import transformers, triton; \
		print('with transformers', transformers.__version__, '| triton', triton.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -q -m hf -n auto --dist loadfile
	$(OLDEST_VENV)/bin/python -m pytest -q -n auto --dist loadfile $(OLDEST_KERNEL_TESTS)

lint: setup
	$(VENV)/bin/ruff check mlagen tests
	$(VENV)/bin/ruff format --check mlagen

format: setup
	$(VENV)/bin/ruff format mlagen

generate: setup
	$(PY) -m mlagen generate --all

# Benchmarks against torch SDPA, FlexAttention and the reference (JSON in benchmarks/), then the
# plots and BENCHMARKS.md. Without a GPU these are smoke runs (tiny shapes under the interpreter,
# not performance numbers); on a GPU run `make bench BENCH_FLAGS=` for the real ones, or
# scripts/gpu_suite.sh for the GPU suite alone in one device call (README: How to run the GPU suite).
BENCH_FLAGS ?= --smoke
bench: setup
	$(PY) -m mlagen bench specs/deepseek_v3.yaml --mode prefill $(BENCH_FLAGS)
	$(PY) -m mlagen bench specs/deepseek_v3.yaml --mode train $(BENCH_FLAGS)
	$(PY) -m mlagen bench specs/deepseek_v3.yaml --mode decode $(BENCH_FLAGS)
	$(PY) -m mlagen bench specs/llama3_8b.yaml --mode prefill $(BENCH_FLAGS)
	$(PY) -m mlagen bench --suite gpu $(BENCH_FLAGS)
	$(PY) -m mlagen bench --plot --report
