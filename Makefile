# make install: .venv with torch 2.13.0 (CPU wheel) and the project; the demo model folders.
# make run:     install, then serve conf/srv.conf in the foreground.
# make test:    install with the test extra, then the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: install run test lint bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	touch $@

install: $(STAMP)
	$(PY) -m models.demo models/store

$(TSTAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@

run: install
	exec bin/modelsrv -c conf/srv.conf

test: install $(TSTAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(TSTAMP)
	$(VENV)/bin/ruff check server models tests bench

bench: install $(TSTAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) models/store run logs
