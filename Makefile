# The two quick-start commands: `make run` (the main job) and `make test`.
# Data: $METALSTM_DATA, defaulting to ../shared/data when it exists beside the repository.
SHELL := /bin/bash
export METALSTM_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
VENV := .venv/bin
RUN_DIR ?= runs/quickstart
EPISODES ?= 1000

.PHONY: run test lint setup
setup: .venv/.installed
.venv/.installed: pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh
	touch $@

# Main job: verify the data, meta-train a short Omniglot 5-way 1-shot run, evaluate it on the
# 600 fixed test episodes, then evaluate the shipped (fully trained) omniglot-5w1s on the same ones.
run: setup
	$(VENV)/metalstm data verify omniglot
	$(VENV)/metalstm train --preset omniglot-5w1s --out $(RUN_DIR) --episodes $(EPISODES) --force
	$(VENV)/metalstm evaluate --checkpoint $(RUN_DIR)/best --episodes 600
	$(VENV)/metalstm evaluate --checkpoint omniglot-5w1s --episodes 600

test: setup
	$(VENV)/python -m pytest -q

lint: setup
	$(VENV)/ruff check src tests benchmarks
	$(VENV)/ruff format --check src tests benchmarks
	$(VENV)/mypy
