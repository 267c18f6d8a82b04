# fewshot_seg — run `make help` for the list of targets and variables.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

DATA ?=
STAGES ?=
# DATA=<a data YAML>: the dataset whose stage files train it, from the YAML's DataModule (or set DATASET).
DATASET_CocoFormatDataModule := coco_format
DATASET_MaskFolderDataModule := mask_folder
DATA_CLASS = $(if $(DATA),$(lastword $(subst ., ,$(shell grep -m1 'class_path:' $(DATA)))))
DATASET ?= $(or $(DATASET_$(DATA_CLASS)),synthetic)
FOLD ?= 0
SHOT ?= 1
SEED ?= 0
FOLDS ?= 0 1 2 3
SHOTS ?= 1 5
SEEDS ?= 0
DATA_ROOT ?=
DEVICES ?=
NODES ?=
ARGS ?=
FORCE ?=
RUN_DIR ?= runs/$(DATASET)/fold$(FOLD)/seed$(SEED)
SWEEP ?= lightning_configs/sweeps/stage1_pos_cpu_demo.yaml
SWEEP_ID ?=
COUNT ?=
CKPT ?=
CLASSES ?=
# Benchmarks whose models come from another dataset (test-fold opts in to the class-overlap report).
TRANSFER := coco2pascal deepglobe isic2018 chestxray
DATAMODULE_synthetic := SyntheticDataModule
DATAMODULE_pascal := Pascal5iDataModule
DATAMODULE_coco := Coco20iDataModule
DEFAULT_ROOT_synthetic := data/synthetic
DEFAULT_ROOT_pascal := data/VOCdevkit/VOC2012
DEFAULT_ROOT_coco := data/coco
DATAMODULE_coco_format := CocoFormatDataModule
DATAMODULE_mask_folder := MaskFolderDataModule
DEFAULT_ROOT_coco_format := data/my_coco_export
DEFAULT_ROOT_mask_folder := data/my_masks
TRAIN_FOLD = $(PY) -m fewshot_seg.tools.train_fold --dataset $(DATASET) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) \
	$(if $(DEVICES),--devices $(DEVICES)) $(if $(NODES),--nodes $(NODES)) $(if $(FORCE),--force) \
	$(if $(DATA),--data-config $(DATA)) $(if $(STAGES),--stage-configs $(STAGES))

.PHONY: help
help: ## List the targets and their variables
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables (current value):"
	@echo "  DATASET=$(DATASET)  synthetic | pascal | coco | fss1000 | lvis92i | coco_format | mask_folder (train-fold); any data_<DATASET>.yaml (test-fold)"
	@echo "  DATA=$(DATA)  a data YAML instead of the dataset's, e.g. your copy of lightning_configs/data_coco_format.yaml (train-fold)"
	@echo "  STAGES=\"$(STAGES)\"  two stage YAMLs instead of the dataset's, e.g. \"stage1_pos_cpu_demo.yaml stage2_mm_cpu_demo.yaml\""
	@echo "  CLASSES=$(CLASSES)  1: aggregate adds the per-class IoU table (class names)"
	@echo "  FOLD=$(FOLD) SHOT=$(SHOT) SEED=$(SEED)  one fold (train-fold, episodes)"
	@echo "  FOLDS=\"$(FOLDS)\" SHOTS=\"$(SHOTS)\" SEEDS=\"$(SEEDS)\"  the grid of train-all"
	@echo "  DATA_ROOT=$(DATA_ROOT)  dataset folder (default: the data YAML's root)"
	@echo "  DEVICES=$(DEVICES) NODES=$(NODES)  --trainer.devices / --trainer.num_nodes (multi-GPU: docs/distributed.md)"
	@echo "  RUN_DIR=$(RUN_DIR)"
	@echo "  ARGS=\"$(ARGS)\"  extra fewshot-seg arguments, e.g. ARGS=\"--trainer.max_steps=100\""
	@echo "  FORCE=$(FORCE)  1: train-fold/train-all start a fold over when its arguments changed (earlier run moved aside)"
	@echo "  CKPT=$(CKPT)  a stage-2 checkpoint (test-fold)"
	@echo "  SWEEP=$(SWEEP)  SWEEP_ID=$(SWEEP_ID)  COUNT=$(COUNT)  (sweep, agent)"

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
test-slow: ## Run only the slow tests (multi-process, paper size, longer training)
	$(PY) -m pytest -q -m slow

.PHONY: lint
lint: ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: train-fold
train-fold: ## Stage 1 -> stage 2 -> test on FOLD at SHOT; re-run resumes; last line = the fold summary
	$(TRAIN_FOLD) --fold $(FOLD) --shots $(SHOT) --seed $(SEED) --run-dir $(RUN_DIR) $(if $(ARGS),-- $(ARGS))

.PHONY: train-all
train-all: ## Every fold of FOLDS x seed of SEEDS (stage 2 per shot of SHOTS), then the aggregate table
	@set -e; for seed in $(SEEDS); do for fold in $(FOLDS); do \
		$(TRAIN_FOLD) --fold $$fold --shots $(SHOTS) --seed $$seed --run-dir runs/$(DATASET)/fold$$fold/seed$$seed \
			$(if $(ARGS),-- $(ARGS)); \
	done; done
	$(MAKE) --no-print-directory aggregate DATASET=$(DATASET)

.PHONY: test-fold
test-fold: ## Test a stage-2 CKPT on DATASET (any data_<DATASET>.yaml, test-only benchmarks too) at FOLD, SHOT
	@test -n "$(CKPT)" || { echo "CKPT=<stage-2 checkpoint> is required"; exit 2; }
	$(VENV)/bin/fewshot-seg test -c lightning_configs/trainer.yaml -c lightning_configs/data_$(DATASET).yaml \
		-c lightning_configs/stage2_mm.yaml --data.init_args.fold=$(FOLD) --data.init_args.shot=$(SHOT) \
		$(if $(DATA_ROOT),--data.init_args.root=$(DATA_ROOT)) --ckpt_path=$(CKPT) \
		$(if $(filter $(DATASET),$(TRANSFER)),--model.init_args.allow_class_overlap=true) \
		--trainer.default_root_dir=$(RUN_DIR) --trainer.logger.init_args.save_dir=$(RUN_DIR) $(ARGS)

.PHONY: aggregate
aggregate: ## The fold summaries under runs/DATASET -> one table (runs/DATASET/summary.md + .csv)
	$(PY) -m fewshot_seg.tools.aggregate runs/$(DATASET) -o runs/$(DATASET)/summary $(if $(CLASSES),--classes)

.PHONY: episodes
episodes: ## Render a PNG grid of a few episodes (DATASET, DATA_ROOT) to RUN_DIR/episodes.png
	$(PY) -m datamodules.visualize --datamodule $(DATAMODULE_$(DATASET)) \
		--root $(or $(DATA_ROOT),$(DEFAULT_ROOT_$(DATASET))) --fold $(FOLD) --shot $(SHOT) --out $(RUN_DIR)/episodes.png

.PHONY: benchmark
benchmark: ## Data throughput and model speed tables on this machine
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/model_speed.py

.PHONY: gpu-check
gpu-check: ## On a CUDA machine: step profile and host overhead, step time / memory per precision, inference, Segmenter graphs, deformable attention, a CLI run
	$(PY) benchmarks/gpu_check.py --out gpu_check.md

.PHONY: sweep
sweep: ## Register a W&B sweep from SWEEP=lightning_configs/sweeps/<file>.yaml (prints its id)
	$(VENV)/bin/wandb sweep $(SWEEP)

.PHONY: agent
agent: ## Run a W&B sweep agent: make agent SWEEP_ID=<entity/project/id> [COUNT=n]
	@test -n "$(SWEEP_ID)" || { echo "SWEEP_ID is required (printed by make sweep)"; exit 2; }
	$(VENV)/bin/wandb agent $(if $(COUNT),--count $(COUNT)) $(SWEEP_ID)
