# `make run`: the default comparison of the three collapse strategies.
# `make test`: the test suite.  Both create (or reuse) the virtualenv in $(VENV) first.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.ptlab-installed
SOURCES := pyproject.toml setup.py $(wildcard core/*/*.c)

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

clean:
	rm -rf build *.egg-info core/*/*.so
