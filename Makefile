# Every target sets up .venv first (scripts/setup.sh), so each is one command on a fresh clone.
.PHONY: setup run test test-all lint format slurm-start slurm-stop bench

ARGS ?= model=resnet20 quant=dorefa bits=1
PY := .venv/bin/python

setup:
	@scripts/setup.sh

run: setup  ## the main job: make run ARGS="model=resnet20 quant=dorefa bits=1 ..."
	$(PY) launch.py $(ARGS)

test: setup  ## fast suite (a few minutes on 2 cores)
	$(PY) -m pytest -m "not slow and not slurm" -q

test-all: setup  ## everything CI runs: lint, fast suite, slow tests, SLURM tests on a local cluster
	bash .ci/run

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports

format: setup
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

slurm-start:
	scripts/slurm-cluster.sh install && scripts/slurm-cluster.sh start

slurm-stop:
	scripts/slurm-cluster.sh stop
