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
DATAMODULE_synthetic := SyntheticDataModule
DATAMODULE_pascal := Pascal5iDataModule
DATAMODULE_coco := Coco20iDataModule
DEFAULT_ROOT_synthetic := data/synthetic
DEFAULT_ROOT_pascal := data/VOCdevkit/VOC2012
DEFAULT_ROOT_coco := data/coco

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

.PHONY: train-fold
train-fold: ## Stage 1 -> stage 2 -> test on one fold; prints the table, last line = results.json
	$(PY) -m fewshot_seg.tools.train_fold --dataset $(DATASET) --fold $(FOLD) --shot $(SHOT) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) --run-dir $(RUN_DIR) $(if $(ARGS),-- $(ARGS))

.PHONY: episodes
episodes: ## Render a PNG grid of a few episodes (DATASET, DATA_ROOT) to $(RUN_DIR)/episodes.png
	$(PY) -m datamodules.visualize --datamodule $(DATAMODULE_$(DATASET)) \
		--root $(or $(DATA_ROOT),$(DEFAULT_ROOT_$(DATASET))) --fold $(FOLD) --shot $(SHOT) --out $(RUN_DIR)/episodes.png

.PHONY: aggregate
aggregate: ## Gather the 4 folds' results.json under runs/$(DATASET) into one Markdown + CSV table
	$(PY) -m fewshot_seg.tools.aggregate runs/$(DATASET) -o runs/$(DATASET)/summary

.PHONY: benchmark
benchmark: ## Data throughput and model speed tables on this machine
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/model_speed.py

SWEEP ?= lightning_configs/sweeps/stage1_pos_cpu_demo.yaml
.PHONY: sweep
sweep: ## Register a W&B sweep from SWEEP=lightning_configs/sweeps/<file>.yaml (prints its id)
	$(VENV)/bin/wandb sweep $(SWEEP)

.PHONY: agent
agent: ## Run a W&B sweep agent: make agent SWEEP_ID=<entity/project/id> [COUNT=n]
	@test -n "$(SWEEP_ID)" || { echo "SWEEP_ID is required (printed by make sweep)"; exit 2; }
	$(VENV)/bin/wandb agent $(if $(COUNT),--count $(COUNT)) $(SWEEP_ID)
