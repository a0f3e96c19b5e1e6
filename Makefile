# make demo / make test set everything up on a fresh machine (Python >= 3.11, no GPU needed).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/batchmates compare --methods all --data digits --seeds 2 --out runs/demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests

test: $(VENV)/.installed lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf runs .pytest_cache .ruff_cache
