# fewshot_seg — run `make help` for the list of targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

FOLD ?= 0
SHOT ?= 1
DATASET ?= synthetic
DATA_ROOT ?=
RUN_DIR ?= runs/$(DATASET)/fold$(FOLD)

.PHONY: help
help: ## List the targets and their variables
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables: FOLD=$(FOLD) SHOT=$(SHOT) DATASET=$(DATASET) (synthetic|pascal|coco) DATA_ROOT=$(DATA_ROOT) RUN_DIR=$(RUN_DIR)"

$(PY):
	$(PYTHON) -m venv $(VENV)

.PHONY: install
install: $(PY) ## Create .venv and install the package, pinned dependencies and dev tools
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@$(PY) -c "import fewshot_seg, datamodules, torch; print('fewshot_seg', fewshot_seg.__version__, '| torch', torch.__version__)"

.PHONY: test
test: ## Run the default test suite (no slow tests)
	$(PY) -m pytest -q

.PHONY: test-slow
test-slow: ## Run only the slow tests (multi-process, longer training)
	$(PY) -m pytest -q -m slow

.PHONY: lint
lint: ## ruff check
	$(VENV)/bin/ruff check .
