# moe-lab: every target creates what it needs; `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: it installs from this machine's local disk. A bare `torch` pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Triton for the `triton` backend and its interpreter tests (3.7.1, 3.8.0 and 3.9.0 pass them on torch 2.13;
# 3.8 is what torch 2.14's CUDA builds pin). A CUDA torch brings its own matching Triton: skip this there.
TRITON_SPEC ?= triton==3.8.0
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test lint format run bench reproduce report clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet "$(TRITON_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,gpu]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install moe-lab with its dev tools (torch pinned to the CPU build)

# test files run in this many processes; each file stays in one process, so its module fixtures run once
# (most tests wait on moe-lab subprocesses, so 2 workers nearly halve the wall time on 2 cores)
TEST_WORKERS ?= 2

test: $(STAMP) ## run the test suite
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: $(STAMP) ## check style with ruff, and that imports run one way with import-linter (pyproject.toml)
	$(BIN)/ruff check moe_lab tests
	$(BIN)/ruff format --check moe_lab tests
	$(BIN)/lint-imports

format: $(STAMP) ## format the code with ruff
	$(BIN)/ruff check --fix moe_lab tests
	$(BIN)/ruff format moe_lab tests

run: $(STAMP) ## the main job: pretrain the `small` sparse LM on the embedded corpus (offline, ~7 min on 2 cores)
	$(BIN)/moe-lab pretrain small

# every study at its default CPU size, in the order the README's results table lists them; finetune-tasks (the
# check of the fine-tuning tasks, not a claim) goes first of the fine-tuning sweeps, which share its pretrainings
STUDIES ?= top-k capacity-factor z-loss-stability router-fluctuation stablemoe finetune-tasks freeze token-drop aux-loss-finetune overfit finetune-grid
# grid points run in parallel, one process per core with one thread each (small matmuls scale poorly across
# threads); with the studies' seeds the run of 2026-12-02 took 91 min on 2 cores, and the designs of 2026-12-07
# (8 seeds of aux-loss-finetune; z-loss-stability under bf16, its baseline and z-loss at 12 seeds; finetune-grid on
# the large task at 4 seeds; overfit at 7) bring it to about eight hours (docs/studies.md,
# "`make reproduce`"). The thread count
# changes the float summation order, so a rerun of results/ needs these same arguments (and matches only to float
# noise).
SWEEP_ARGS ?= --launcher joblib train.threads=1 logger.progress=false

reproduce: $(STAMP) ## run every study at its default size and seeds, then moe-lab report (about 8 h on 2 cores)
	@start=$$(date +%s); failed=""; \
	for study in $(STUDIES); do \
		t0=$$(date +%s); \
		$(BIN)/moe-lab sweep $$study $(SWEEP_ARGS) || failed="$$failed $$study"; \
		echo "== $$study took $$(( $$(date +%s) - t0 )) s"; \
	done; \
	$(BIN)/moe-lab report --format md,html,csv || failed="$$failed report"; \
	echo "== make reproduce took $$(( $$(date +%s) - start )) s"; \
	if [ -n "$$failed" ]; then echo "== failed:$$failed"; exit 1; fi

report: $(STAMP) ## render results/ as report.md, report.html, report.csv and plots
	$(BIN)/moe-lab report --format md,html,csv

bench: $(STAMP) ## benchmark dispatch backends, routers and parallel layouts, JSON to results/bench/
	$(BIN)/moe-lab bench dispatch --json results/bench/dispatch.json
	$(BIN)/moe-lab bench routing --json results/bench/routing.json
	$(BIN)/moe-lab bench parallel --json results/bench/parallel.json

clean: ## remove the environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
