# `make demo` and `make test` set everything up on a fresh machine: they create .venv when it is
# missing and install the pinned requirements into it (CPU JAX).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: demo test learn lint format bench clean-venv

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m zipir_jax.demo --output demo_out

# Does it learn? Trains a small config through every stage, scores held-out photos (~40 min, CPU).
learn: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) bench/learning.py --output learning_out

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15 tests

# The formatter and linter configured in pyproject.toml ([tool.ruff]); CI runs `make lint`.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) bench/vae.py

clean-venv:
	rm -rf $(VENV)
