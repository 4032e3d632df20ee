# Two commands on a fresh machine:
#   make serve   -- create .venv, install core + first-party plugins, run the proxy on defaults
#   make test    -- create .venv, install with test extras, run every test (core and plugins)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(wildcard plugins/cheapproxy-*)

$(BIN)/cheapproxy: pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[fast,test]' $(foreach p,$(PLUGINS),-e $(p))
	touch $@

.PHONY: install serve test
install: $(BIN)/cheapproxy

serve: install
	$(BIN)/cheapproxy serve

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
