# Two entry points, each working on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
PIP_TORCH ?=      # e.g. --index-url https://download.pytorch.org/whl/cpu: where torch comes from
VENV ?= .venv
BIN := $(VENV)/bin

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(if $(PIP_TORCH),$(BIN)/pip install -q torch==2.13.0 $(PIP_TORCH))
	$(BIN)/pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q -n auto --dist worksteal tests   # one worker per core (pytest-xdist)

reproduce: install
	$(BIN)/python reproduce.py

.PHONY: install test reproduce
