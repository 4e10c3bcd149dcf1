# make install: .venv with torch 2.13.0 (CPU wheel) and the project; the demo model folders.
# make run:     install, then serve conf/srv.conf in the foreground.
# make test:    install with the test extra, then the test suite.
# make fuzz:    the property-based tests (tests/test_fuzz_http.py) with the "fuzz" hypothesis profile:
#               many more examples than the suite's default run (FUZZ_EXAMPLES overrides it).
# make bench:     install, bench-env, then bench/run.py (BENCH_ARGS passed on, e.g. "--quick --only tiny").
# make bench-env: .venv-bench, the peers' separate venv: torch 2.13.0 CPU first, then what the repo's
#                 models package imports (numpy, Pillow, safetensors, tokenizers, jinja2, msgpack), the
#                 peers (LitServe; FastAPI + uvicorn[standard]; TorchServe + torch-model-archiver, whose
#                 frontend also needs java on PATH), transformers[serving] for `transformers serve` and
#                 generate(), py-spy; see docs/BENCHMARKS.md.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test
BVENV  ?= .venv-bench
BSTAMP := $(BVENV)/.installed

.PHONY: install run test fuzz lint bench bench-env bench-gen clean

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

fuzz: install $(TSTAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -ra -p no:cacheprovider tests/test_fuzz_http.py tests/test_hostile_zmq.py $(PYTEST_ARGS)

lint: $(TSTAMP)
	$(VENV)/bin/ruff check server models tests bench

bench: install $(TSTAMP) bench-env
	$(PY) bench/run.py $(BENCH_ARGS)

$(BVENV)/bin/python:
	python3 -m venv $(BVENV)

# torch first, pinned (and pinned again in the second install, so nothing there may move it): any
# other version would be a multi-GB download of a CUDA build
BENCH_PKGS := numpy Pillow safetensors tokenizers jinja2 msgpack fastapi 'uvicorn[standard]' litserve \
              torchserve torch-model-archiver 'transformers[serving]==5.24.0' py-spy
$(BSTAMP): Makefile | $(BVENV)/bin/python
	$(BVENV)/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
		|| $(BVENV)/bin/python -m pip install -q torch==2.13.0
	$(BVENV)/bin/python -m pip install -q torch==2.13.0 $(BENCH_PKGS)
	@command -v java >/dev/null || echo "note: no java on PATH: TorchServe's points will be skipped (Debian: apt-get install openjdk-17-jre-headless)"
	touch $@

bench-env: $(BSTAMP)

bench-gen: install $(TSTAMP) bench-env
	$(PY) bench/generate.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) models/store run logs
