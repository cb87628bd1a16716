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

# The peers install beside the product, never into its dependencies: OpenVINO + NNCF as the
# `peers` extra; Optimum and Olive pin other transformers/optuna versions, so they go to their
# own folders under bench/out (see bench/peers.py).
bench-peers: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[peers]" "$(TORCH)"
	$(BIN)/python -m pip install -q --no-deps --target bench/out/peers-site optimum==2.1.0 \
		optimum-onnx==0.1.0 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2
	$(BIN)/python -m pip install -q --no-deps --target bench/out/olive-site olive-ai==0.13.0 \
		optuna==5.0.0 torchmetrics==1.9.0 lightning-utilities==0.15.3 colorlog==6.12.0
	$(BIN)/python bench/peers.py

clean:
	rm -rf $(VENV) build *.egg-info tunewatch.db tunewatch.db-wal tunewatch.db-shm
