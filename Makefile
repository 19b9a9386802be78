# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv in the repository root first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hpcbrain-installed
DEMO := runs/demo

.PHONY: setup demo test test-fast clean-demo serve browser

setup: $(STAMP)

# torch is installed first and pinned (constraints.txt): unpinned, deepspeed would pull the
# newest torch, a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,register]'
	$(PY) -m pip check
	touch $(STAMP)

# Under CI the real-cluster tests must run: install the dev cluster's Debian packages up front
# so a missing package fails here, loudly, rather than as a skipped test. The QC pages' test
# opens them in headless Chromium (Debian's package), installed here when we are root.
test: setup browser
	@if [ "$${CI:-}" = true ]; then slurm/devcluster/start.sh --install-only; fi
	$(PY) -m pytest

browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# The inner loop (under 5 minutes on 2 cores): everything but the Slurm cluster, the
# multi-process (gloo) tests and the few that take a minute each (marker `minutes`).
test-fast: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slurm and not multiprocess and not minutes"

# Synthetic cohort -> cohort store -> LSOR training -> evaluation and registry. Re-running
# reuses what is already built and resumes the training run.
demo: setup $(DEMO)/cohort.zarr/zarr.json
	$(PY) launch/submit.py --cfg lsor.yaml --cfg demo.yaml --local

$(DEMO)/bids/participants.tsv:
	$(VENV)/bin/hpcbrain synth --out $(DEMO)/bids --subjects 80 --seed 0

$(DEMO)/cohort.zarr/zarr.json: $(DEMO)/bids/participants.tsv
	$(VENV)/bin/hpcbrain convert $(DEMO)/bids --out $(DEMO)/cohort.zarr --shape 32 --workers 2

clean-demo:
	rm -rf $(DEMO)

# The MLflow UI and API on the project's tracking store (what runs log to by default), on
# loopback only: the server has no authentication. For a lab server reachable from other
# machines, opt in with SERVE_HOST=0.0.0.0 SERVE_ARGS="--allowed-hosts NAME:PORT" behind your
# own authenticating proxy, and point runs at it with tracking.uri=http://NAME:PORT.
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 5000
SERVE_ARGS ?=
serve: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--artifacts-destination $(CURDIR)/mlartifacts \
		--host $(SERVE_HOST) --port $(SERVE_PORT) --workers 1 $(SERVE_ARGS)
