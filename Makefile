# awd-ablation: `make ablation` runs the default study, `make test` the test suite. Both install first.
# Several machines: `make worker` on each with shared STORAGE and TRACKING_URI (README: Several machines).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?= studies/ablation.toml
# Corpora: $AWD_DATA_DIR if set; else the team checkout's ../shared/data when it holds PTB; else ./data,
# where a missing corpus is downloaded on first use.
AWD_DATA_DIR ?= $(if $(wildcard ../shared/data/ptb/ptb.train.txt),$(abspath ../shared/data),$(abspath data))
export AWD_DATA_DIR

# Where `make ablation` and `make ui` keep results (the MLflow and Optuna defaults of `harness ablate`);
# postgresql://USER@HOST/DB and http://HOST:PORT share them between machines (passwords: PGPASSWORD).
TRACKING_URI ?= sqlite:///mlflow.db
STORAGE ?= sqlite:///optuna.db
# The UIs answer this machine only, unless UI_HOST says otherwise: MLflow's runs (make ui) and Optuna's
# studies (make dashboard, optuna-dashboard).
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080

.PHONY: install test ablation plan worker report ui dashboard bench clean mutants

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest -m "not gpu" -q tests

ablation: install
	$(BIN)/python -m harness ablate $(STUDY) --storage $(STORAGE) --tracking-uri $(TRACKING_URI)

# Cost before running: runs, epochs, device-hours and wall time on this machine's devices (harness.plan).
plan: install
	$(BIN)/python -m harness plan $(STUDY)

worker: install
	$(BIN)/python -m harness worker $(STUDY) --storage $(STORAGE) --tracking-uri $(TRACKING_URI)

report: install
	$(BIN)/python -m harness report $(STUDY) --storage $(STORAGE) --tracking-uri $(TRACKING_URI)

ui: install
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) --host $(UI_HOST) --port $(UI_PORT)

dashboard: install
	$(BIN)/optuna-dashboard $(STORAGE) --host $(UI_HOST) --port $(DASHBOARD_PORT)

bench: install
	$(BIN)/python -m harness bench

# The GPU check (README: GPU check): tests, memory, bench, one paper epoch and trial packing on a CUDA GPU,
# one table in GPU_CHECK_OUT; without a GPU it says what it skipped and exits 0. For a GPU machine that has
# only torch, numpy and pytest: `make gpu-check-command` builds GPU_BUNDLE (the pure-Python packages the
# harness imports at start-up, and PTB) and prints the one command line to run there, and what to carry.
GPU_BUNDLE := .gpu-bundle
GPU_CHECK_OUT ?= runs/gpu-check
.PHONY: gpu-check gpu-bundle gpu-check-command

gpu-check: install
	$(BIN)/python -m harness.gpu_check --out $(GPU_CHECK_OUT)

gpu-bundle: install
	$(BIN)/python -m harness.gpu_check --bundle $(GPU_BUNDLE)

gpu-check-command: gpu-bundle
	@$(BIN)/python -m harness.gpu_check --print-command

# Mutation testing of harness/{dropout,model,train,ledger}.py against the fast tests ([tool.mutmut] in
# pyproject.toml), then the score per file. One mutant at a time by default, one torch thread each: every mutant
# runs CPU tests. mutmut keeps the verdicts of functions whose code did not change: after adding tests,
# `rm -rf mutants` first, or survivors the new tests kill still show as survivors.
MUTANT_CHILDREN ?= 1
mutants: install
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTANT_CHILDREN)
	$(BIN)/python tests/mutation_score.py

clean:
	rm -rf $(VENV) runs *.egg-info
