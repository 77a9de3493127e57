# dualpath-operator: self-documenting Makefile. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Build with the machine's Go; a module needing a newer one fails loudly instead of downloading a toolchain.
export GOTOOLCHAIN ?= local
export PYTHONUNBUFFERED := 1

PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
BIN := .dev/bin
export PATH := $(CURDIR)/$(BIN):$(CURDIR)/$(VENV)/bin:$(PATH)
PYTEST := $(PY) -m pytest
NODES ?= 4
PROFILE ?= h200

.PHONY: help setup venv tools fmt lint typecheck imports test test-unit test-integration test-e2e test-gpu \
        crds verify chart-lint cluster-up cluster-down demo nodes-demo bench bench-operator e2e-kind lock clean

help:  ## List targets
	@awk -F':.*## ' '/^[a-zA-Z0-9_-]+:.*## /{printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: venv tools  ## Idempotent: .venv with the project, Go-built control plane, Debian prometheus + node_exporter

$(VENV)/.installed: pyproject.toml requirements.lock
	@echo "[setup] python environment ($(VENV)) with uv"
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q --python $(PY) -r requirements.lock
	$(UV) pip install -q --python $(PY) --no-deps -e .
	touch $@

venv: $(VENV)/.installed  ## Create .venv and install the project with the engine and dev extras (locked)

tools:  ## Build (or reuse from ~/.cache/dualpath) etcd, kwok, helm, kube-* and link them into .dev/bin
	hack/build-tools.sh etcd kwok helm k8s
	hack/link-tools.sh

lock:  ## Re-resolve requirements.lock from pyproject.toml
	$(UV) pip compile --quiet --python-version 3.11 --extra engine --extra dev pyproject.toml -o requirements.lock

fmt: venv  ## Format and auto-fix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lint: venv  ## ruff format check, ruff lint, mypy --strict, import-linter contracts
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

typecheck: venv  ## mypy --strict only
	$(PY) -m mypy

crds: venv  ## Regenerate crds/, the chart's CRD copy and docs/api.md from the pydantic models
	$(PY) -m dualpath_operator.crdgen --out crds --chart charts/dualpath-operator/crds --docs docs/api.md

verify: crds  ## Regenerate generated files and fail if they differ from what is checked in
	git diff --exit-code -- crds charts/dualpath-operator/crds docs/api.md
	@test -z "$$(git status --porcelain -- crds charts/dualpath-operator/crds docs/api.md)" || \
	  { echo "generated files are not checked in:"; git status --porcelain -- crds charts/dualpath-operator/crds docs/api.md; exit 1; }

chart-lint: setup  ## helm lint + helm template of the chart
	$(BIN)/helm lint charts/dualpath-operator
	$(BIN)/helm template dp charts/dualpath-operator >/dev/null

test-unit: venv  ## Fast tests of pure code (no cluster)
	$(PYTEST) tests/unit

test-integration: setup  ## Operator and harness against the real local control plane
	$(PYTEST) -m integration tests/cluster tests/integration

test-e2e: setup  ## Full loop: operator, engines, workload, telemetry on the local cluster
	$(PYTEST) -m e2e tests/e2e

test-gpu: venv  ## CUDA tests (run on the GPU machine, never in CI)
	$(PYTEST) -m gpu tests/gpu

test: setup lint verify  ## Everything CI runs: lint, type-check, contracts, generated files, unit + integration + e2e
	$(PYTEST) tests --ignore=tests/gpu -m "not gpu"

cluster-up: setup  ## Start the local control plane with NODES fake PROFILE nodes (state in .dev/cluster)
	$(PY) -m tests.cluster up --nodes $(NODES) --profile $(PROFILE)

cluster-down:  ## Stop the local control plane started by cluster-up (by PID)
	$(PY) -m tests.cluster down

DURATION ?= 240
demo: setup  ## The whole system live: local cluster, chart, operator, engines, workload, rebalancing (DURATION=s)
	$(PY) -m tests.e2e.demo --duration $(DURATION) --nodes $(NODES)

nodes-demo: setup  ## Only the local control plane and its fake GPU/RDMA nodes, printed, then torn down
	$(PY) -m tests.cluster demo --nodes $(NODES) --profile $(PROFILE)

bench: venv  ## CPU benchmarks and the simulator (results go to docs/benchmarks.md)
	$(PY) -m bench

bench-operator: setup  ## Operator at scale: 100 fake nodes, 10 clusters (local control plane)
	$(PY) -m bench.operator_scale --nodes 100 --clusters 10 --markdown

e2e-kind:  ## The e2e suite on a kind cluster (needs Docker, kind, helm; not run in CI)
	tests/e2e/kind/run.sh $(KIND_ARGS)

clean:  ## Remove .dev (stops nothing: run cluster-down first)
	rm -rf .dev
