# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv/ with the pinned dependencies and builds the extension when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.calibkernels-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)
MAX_JOBS ?= $(shell nproc)

.PHONY: demo test bench build wheel-check clean

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

# A wheel (`pip wheel --no-build-isolation`, built from a copy of the tree so that this one's build
# is left alone; CPU kernels only, to keep CI short) installed into a fresh venv that sees .venv's
# torch and nothing else, then a smoke test from outside the repository.
wheel-check: $(DEPS)
	set -e; src=$$(mktemp -d); v=$$(mktemp -d); \
	git ls-files -z --cached --others --exclude-standard | xargs -0 tar c | tar x -C $$src; \
	cd $$src && CALIBKERNELS_CUDA=0 MAX_JOBS=$(MAX_JOBS) $(CURDIR)/$(PY) -m pip wheel --quiet \
		--disable-pip-version-check --no-build-isolation --no-deps -w $$src/dist .; \
	$(PYTHON) -m venv $$v; \
	$(CURDIR)/$(PY) -c "import site; print(site.getsitepackages()[0])" \
		> $$($$v/bin/python -c "import site; print(site.getsitepackages()[0])")/torch_from_venv.pth; \
	$$v/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
		$$src/dist/*.whl; \
	cd $$v && $$v/bin/python $(CURDIR)/.ci/wheel_smoke.py; rm -rf $$src $$v

clean:
	rm -rf build dist *.egg-info calibkernels/*.so calibkernels/_build_info.py $(BUILT)
