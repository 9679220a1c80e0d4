# Two commands do all the set-up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install quickstart lint test test-fast bench cluster-down clean

# Re-running is cheap: the install only repeats when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/rayprune sweep --space search_spaces/quickstart.yaml

# ruff (rules and format) over the whole tree, then mypy on rayprune/ (settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy

# Two pytest-xdist workers: many tests wait on subprocesses, Ray start-up or servers, so two overlap
# on 2 cores. --dist loadfile keeps each module on one worker (its module-scoped sweeps, servers and
# Ray runtimes are built once); tests/conftest.py orders the modules longest first.
# PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: lint
	$(PY) -m pytest -q $(XDIST)

# The fast subset while working (no sweeps, Ray, full method runs or ONNX exports); meant to take under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

bench: $(STAMP)
	$(PY) bench/train_throughput.py

# `ray down` stops the head's MLflow server too (its watcher ends it once Ray stops); stopping it
# first, by its pidfile, lets it finish its writes before the nodes go.
CLUSTER ?= launch/cluster.yaml
RAY     ?= $(if $(wildcard $(VENV)/bin/ray),$(VENV)/bin/ray,ray)
cluster-down:
	$(RAY) exec $(CLUSTER) 'pid=$$(cat ~/.rayprune/mlflow_server.pid 2>/dev/null) && kill -TERM -- -$$pid; \
	  for i in $$(seq 30); do [ -n "$$pid" ] && kill -0 -- -$$pid 2>/dev/null || break; sleep 1; done; \
	  rm -f ~/.rayprune/mlflow_server.pid'
	$(RAY) down -y $(CLUSTER)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
