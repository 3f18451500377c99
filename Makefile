# raycv: `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch/torchvision pair to install first; override on machines where another pair is available.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_ROOT ?= data/demo

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile $(TORCH_SPEC)
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	@# Byte-compile on every core (pip compiles one file at a time: 20 s more on 2 cores). A few packages ship files
	@# that are not Python 3; like pip, this skips them, so its exit status is not an error.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

demo: install
	$(VENV)/bin/raycv demo --root $(DEMO_ROOT)

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

bench: install
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) mlflow.db mlartifacts ray_results .pytest_cache
