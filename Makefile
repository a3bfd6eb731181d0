# properlm: `make test` and `make demo` each set up .venv by themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch lies on this machine's disk; a looser pin could pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all,triton,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install check test lint format typecheck docs docs-sync package demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# ruff's lint rules and its formatter (check only; `make format` rewrites)
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples docs
	$(PY) -m ruff format --check src tests benchmarks examples docs

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks examples docs
	$(PY) -m ruff check --fix src tests benchmarks examples docs

# mypy on src/ and benchmarks/ with the settings in pyproject.toml ([tool.mypy])
typecheck: $(STAMP)
	$(PY) -m mypy

# the documentation site (mkdocs.yml) in strict mode: a warning, broken link or unresolved reference fails;
# the site goes to build/site
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# rewrite the generated regions of docs/ (the examples, every command's --help, the train options table) from the
# code; tests/test_docs.py fails when they are out of date
docs-sync: $(STAMP)
	$(PY) docs/hooks.py --sync

# build the sdist and the wheel, install the wheel in a fresh venv outside the tree and smoke-test it there
package: $(STAMP)
	bash .ci/wheel_smoke.sh $(PY)

# the fast loop while editing: lint, format check, types and the tests not marked slow (the end-to-end ones)
check: lint typecheck
	$(PY) -m pytest -q -m "not slow"

# the full gate (.ci/run): everything in `check`, the strict docs build, every test, the wheel
test: lint typecheck docs
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory package

demo: $(STAMP)
	$(VENV)/bin/properlm demo

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache demo_output
