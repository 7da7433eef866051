# Every target works on a fresh machine: `setup` makes .venv with a CPU build of torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format generate

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on local disk. A bare `torch` requirement would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: generate DeepSeek-V3's kernels and module, run them on CPU under the
# Triton interpreter, compare with the fp64 reference, print the KV-cache bytes per token.
demo: setup
	$(PY) -m mlagen run specs/deepseek_v3.yaml --batch 1 --seq 32

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check mlagen tests
	$(VENV)/bin/ruff format --check mlagen

format: setup
	$(VENV)/bin/ruff format mlagen

generate: setup
	$(PY) -m mlagen generate --all
