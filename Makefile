# Every target installs what it needs first (idempotent: a stamp file skips it when
# pyproject.toml has not changed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export MUJOCO_GL ?= egl

.PHONY: run test test-all lint setup clean suite state-suite

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,cluster,ray]'
	touch $(STAMP)

## run: the main job (a short CP3ER training run on a pixel DMC task; see README).
## Hydra overrides pass through ARGS, e.g. make run ARGS="seed=2 threads=1"
ARGS ?=
run: $(STAMP)
	@echo "make run: CP3ER on pixel cartpole_balance, 8,000 frames (about 10 minutes on 2 cores)."
	@echo "  What to expect: a check that the whole pipeline runs, not a learning result: 8,000"
	@echo "  frames are too few for CP3ER (or DrQ-v2) to learn from pixels, and the evaluation"
	@echo "  return can go down. A run that learns, from states, in about 20 minutes on one core:"
	@echo "  cp3er-train +profile=cpu_states task=cartpole_swingup (seed 1: 868 at 100k frames,"
	@echo "  DrQ-v2 854; uniform random actions 49). Pixels: docs/results/README.md."
	$(BIN)/cp3er-train --config-name demo $(ARGS)

## test: the default (fast) test suite
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

## test-all: every test, slow ones included
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m ''

## suite: the CPU-sized CP3ER vs DrQ-v2 state suite (about an hour on 2 cores; docs/results)
suite: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash benchmarks/cpu_state_suite.sh

## state-suite: CP3ER (paper and stable preset) vs DrQ-v2 from states, 6 tasks x 3 seeds x
## 100k frames at batch 256 (+profile=cpu_states; resumable lanes, one run per core;
## benchmarks/state_suite.txt), then its CSV / table / plots (docs/results, "Collapse remedies"):
## the 3-seed grid, seed 1 with each remedy alone, and the bound penalty alone (the best
## remedy on states) on its 3 seeds beside the grid
state-suite: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH PROFILE=cpu_states OUT=runs/state_suite \
	  JOBS=benchmarks/state_suite.txt bash benchmarks/suite.sh
	$(BIN)/python benchmarks/collect.py runs/state_suite --out runs/state_suite/state_suite \
	  --min-frames 100000 --agents cp3er,cp3er-stable,drqv2
	$(BIN)/python benchmarks/collect.py runs/state_suite --out runs/state_suite/state_remedies \
	  --min-frames 100000 --seeds 1
	$(BIN)/python benchmarks/collect.py runs/state_suite --out runs/state_suite/state_candidate \
	  --min-frames 100000 --seeds 1,2,3 --agents cp3er,cp3er-penalty1,cp3er-stable,drqv2

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info
