# Two entry points, each working on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q tests

reproduce: install
	$(BIN)/python reproduce.py

.PHONY: install test reproduce
