# `make run`: the default comparison of the three collapse strategies.
# `make test`: the test suite.  Both create (or reuse) the virtualenv in $(VENV) first.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.ptlab-installed
# the hot paths setup.py compiles with Cython (core/machine/build.py: COMPILED): an edit to one
# of them makes `make test` / `make run` rebuild it first
HOT := $(shell $(PYTHON) -c "import runpy; print(' '.join('core/%s.py' % m for m in runpy.run_path('core/machine/build.py')['COMPILED']))")
SOURCES := pyproject.toml setup.py core/machine/build.py $(wildcard core/*/*.c) $(wildcard core/*/*.pxd) $(HOT)

.PHONY: run test install lint clean

$(STAMP): $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ptlab run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the compiled modules' .so beside their .py (their generated .c live in build/cython), the C
# primitives' .so, and the install stamp so that the next `make` builds them again
clean:
	rm -rf build *.egg-info core/*/*.so core/*/*/*.so core/_build_hashes.json $(STAMP)
