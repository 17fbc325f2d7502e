# autoglm front door. Every target does its own set-up (virtual environment, binaries).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: help venv venv-operator bins sysdeps lint test test-fast cluster-up cluster-down cluster-status demo \
        bench-runtime bench-runtime-vl bench-agent bench-router bench-auth bench-runtime-gpu bench-operator bench-autoscale golden dashboard dashboard-png clean \
        crd docs docs-reference

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv:  ## Create .venv with the runtime, test, bench, lint and docs extras (torch included)
	@bash scripts/venv.sh runtime,router,test,bench,lint,docs

bins:  ## Build the local control plane's binaries from Go modules (cached)
	@bash devcluster/gobuild/build.sh >/dev/null

sysdeps:  ## Install the Debian packages the local cluster needs (iproute2, nftables) if missing
	@bash scripts/system-deps.sh

lint: venv  ## ruff + mypy on operator/, runtime/, router/ and devcluster/ (config in pyproject.toml), hadolint on the Dockerfiles
	$(VENV)/bin/ruff check operator runtime router devcluster
	$(VENV)/bin/ruff format --check operator runtime router devcluster
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint --no-color Dockerfile.operator Dockerfile.runtime Dockerfile.router

crd: venv  ## Regenerate the CRD (crds/ and the chart's copy) from the typed models (operator/autoglm_operator/models/)
	$(PY) -m autoglm_operator.crdgen
	$(PY) scripts/gen-reference.py

docs-reference: venv  ## Regenerate docs/reference/ (CRD fields, metrics, CLI, Helm values) from their sources
	$(PY) scripts/gen-reference.py

docs: venv  ## Build the docs site into .cache/site (strict: a broken link or a page missing from the nav fails)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: sysdeps venv bins  ## The test command: both tiers (unit + runtime + real control plane)
	$(PYTEST)

test-fast: venv  ## Tests that need no cluster
	$(PYTEST) -m "not cluster"

cluster-up: sysdeps venv bins  ## Start the local cluster in the background (ADDONS="keda hydra": add-ons too); prints `export KUBECONFIG=...` last (after HYDRA_ISSUER=... lines)
	@python3 -m devcluster up --addons $(ADDONS)

cluster-down:  ## Stop the local cluster
	@python3 -m devcluster down

cluster-status:  ## Is the local cluster running; its processes and add-ons
	@python3 -m devcluster status

demo: sysdeps venv bins  ## Local demo: cluster + CRD + operator + example resource + runtime on the tiny model
	@bash scripts/demo.sh

bench-runtime: venv  ## Runtime throughput vs generate and transformers serve (CPU, small model)
	$(PY) bench/bench_runtime.py

bench-runtime-vl: venv  ## Phone-agent workload (screenshots) on small-vl: ours vs sequential generate (CPU)
	$(PY) bench/bench_runtime_vl.py

bench-agent: venv  ## Phone-agent loop on small-vl: TTFT by step, prefix reuse; cache on/off vs transformers serve (CPU)
	$(PY) bench/bench_agent.py $(BENCH_AGENT_ARGS)

bench-router: venv  ## Router: overhead at 50/200 streams, then the agent workload over 3 replicas by policy (CPU)
	$(PY) bench/bench_router.py $(BENCH_ROUTER_ARGS)
	$(PY) bench/bench_router_agent.py $(BENCH_ROUTER_AGENT_ARGS)

bench-auth: venv bins  ## OAuth2 at the router: the token check's cost, then latency through the router with vs without it
	$(PY) bench/bench_auth.py $(BENCH_AUTH_ARGS)
	$(PY) bench/bench_router_auth.py $(BENCH_ROUTER_AUTH_ARGS)

bench-runtime-gpu: venv  ## Runtime tokens/s at batch 1..128 on a GPU
	$(PY) bench/bench_runtime_gpu.py

bench-operator: sysdeps venv bins  ## Operator at scale: N = 100, 500, 1,000 resources on fresh local clusters (table)
	$(PY) bench/bench_operator.py

bench-autoscale: sysdeps venv bins  ## Step load through KEDA autoscaling on the local cluster: table + PNG plot
	$(PY) bench/bench_autoscale.py

dashboard: venv  ## Regenerate the chart's Grafana dashboard from operator/autoglm_operator/dashboard.py
	$(PY) scripts/gen-dashboard.py

dashboard-png: sysdeps venv bins  ## Render the dashboard's key panels from live load on the local cluster (docs/dashboard.png)
	$(PY) bench/render_dashboard.py

golden: venv  ## Regenerate the builders' golden YAML
	UPDATE_GOLDEN=1 $(PYTEST) tests/operator/test_builders.py -q

clean:  ## Remove the virtual environment and caches (keeps the Go module cache)
	rm -rf $(VENV) .cache .pytest_cache
