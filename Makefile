# Everything a fresh machine needs: `make demo` and `make test` create .venv and install.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint types pytest bench bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev,torch,bench]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

# `make demo DEMO_ARGS=` stops at the promotion and waits for `tunewatch approve`.
DEMO_ARGS ?= --yes

demo: $(STAMP)
	$(BIN)/tunewatch demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check monitor tuner migrations tests bench dashboards
	$(BIN)/ruff format --check monitor tuner migrations tests bench dashboards

types: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint types pytest

bench: $(STAMP)
	for b in overhead writer detection tuning serving sequential batching_micro retention \
		api_hostile performance loop; do \
		$(BIN)/python bench/$$b.py || exit 1; done

# The peers (OpenVINO, NNCF, Optimum, Olive) install beside the product: see bench/README.md.
bench-peers: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[peers]" "$(TORCH)"
	$(BIN)/python bench/peers.py

clean:
	rm -rf $(VENV) build *.egg-info tunewatch.db tunewatch.db-wal tunewatch.db-shm
