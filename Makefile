# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv/ with the pinned dependencies and builds the extension when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.calibkernels-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)
MAX_JOBS ?= $(shell nproc)

.PHONY: demo test bench build clean

demo: $(BUILT)
	$(PY) -m calibkernels demo --json out/demo/results.json

test: $(BUILT)
	$(PY) -m pytest tests

bench: $(BUILT)
	$(PY) -m pytest bench --benchmark-columns=median,iqr,rounds --benchmark-sort=name

build: $(BUILT)

$(DEPS): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --quiet --disable-pip-version-check \
		--no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info calibkernels/*.so $(BUILT)
