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

# Where results go: the harness's own defaults (sqlite:///optuna.db and sqlite:///mlflow.db, harness/study/stores.py)
# unless set here: STORAGE=postgresql://USER@HOST/DB and TRACKING_URI=http://HOST:PORT share them between machines
# (passwords: PGPASSWORD). UI_HOST, UI_PORT, DASHBOARD_PORT likewise override `harness ui` / `harness dashboard`.
STORES = $(if $(STORAGE),--storage $(STORAGE)) $(if $(TRACKING_URI),--tracking-uri $(TRACKING_URI))

.PHONY: install test test-fast ablation plan worker report ui dashboard bench clean mutants

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# Every CPU test (GPU tests are deselected); test-fast: the in-process tier alone, under a minute.
test: install
	$(BIN)/python -m pytest -m "not gpu" -q tests

test-fast: install
	$(BIN)/python -m pytest -m "fast and not gpu" -q tests

ablation: install
	$(BIN)/python -m harness ablate $(STUDY) $(STORES)

# Cost before running: runs, epochs, device-hours and wall time on this machine's devices (harness.study.plan).
plan: install
	$(BIN)/python -m harness plan $(STUDY)

worker: install
	$(BIN)/python -m harness worker $(STUDY) $(STORES)

report: install
	$(BIN)/python -m harness report $(STUDY) $(STORES)

ui: install
	$(BIN)/python -m harness ui $(if $(TRACKING_URI),--tracking-uri $(TRACKING_URI)) $(if $(UI_HOST),--host $(UI_HOST)) \
		$(if $(UI_PORT),--port $(UI_PORT))

dashboard: install
	$(BIN)/python -m harness dashboard $(if $(STORAGE),--storage $(STORAGE)) $(if $(UI_HOST),--host $(UI_HOST)) \
		$(if $(DASHBOARD_PORT),--port $(DASHBOARD_PORT))

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

# Mutation testing of the modules [tool.mutmut] in pyproject.toml lists, against the fast tier (make test-fast),
# then the score per file. One mutant at a time by default, one torch thread each: every mutant
# runs CPU tests. mutmut keeps the verdicts of functions whose code did not change: after adding tests,
# `rm -rf mutants` first, or survivors the new tests kill still show as survivors.
MUTANT_CHILDREN ?= 1
mutants: install
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTANT_CHILDREN)
	$(BIN)/python tests/mutation_score.py

clean:
	rm -rf $(VENV) runs *.egg-info
