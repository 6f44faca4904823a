# c3-render: the two commands of the README (make run, make test), and a few more. `make help` lists them.
# Everything runs in the project virtualenv .venv, made from the machine's python3 by scripts/install-deps.sh.
SYSTEM_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export SYSTEM_PYTHON VENV PYTHON

.PHONY: help run test test-fast lint soak bench lock venv clean

## help: list the targets
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  make /'

## run: set up what is missing (system packages, .venv, locked packages), then start Redis, the dev node, the API and a worker (Ctrl-C stops all)
run:
	@export C3_RUN_STARTED=$$(date +%s); bash scripts/install-deps.sh run && bash scripts/run-local.sh

## test: set up what is missing (with the test tools), then lint and run every test (end-to-end and a small soak included)
test:
	@bash scripts/install-deps.sh dev
	@bash scripts/gradio5-venv.sh
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider

## test-fast: the tests without the end-to-end and soak suites
test-fast:
	@bash scripts/install-deps.sh dev
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "not e2e and not soak"

## lint: ruff over the whole tree
lint:
	@bash scripts/install-deps.sh dev
	$(PYTHON) -m ruff check .

## venv: only set up .venv with everything the tests need
venv:
	@bash scripts/install-deps.sh dev

## soak: the full soak test (a few hundred jobs with crashes and outages); prints the table
soak:
	@bash scripts/install-deps.sh dev
	$(PYTHON) bench/soak.py --jobs 300 --workers 4 --seed 42

## lock: re-resolve the lock files from pyproject.toml (after editing its dependencies); `make lock ARGS=--upgrade` takes the newest allowed versions
lock:
	@bash scripts/install-deps.sh dev
	bash scripts/lock.sh $(ARGS)

## bench: every benchmark under bench/ (about 25 minutes; the cost replay on short traces); bench/README.md has their last figures
bench:
	@bash scripts/install-deps.sh dev
	$(PYTHON) bench/queue_scale.py
	$(PYTHON) bench/submit_throughput.py --ceilings
	$(PYTHON) bench/submit_breakdown.py
	$(PYTHON) bench/status_cost.py
	$(PYTHON) bench/worker_memory.py
	$(PYTHON) bench/webhook_latency.py
	$(PYTHON) bench/sigterm_redis_gone.py
	$(PYTHON) bench/sse_streams.py --streams 400 --threads 440
	$(PYTHON) bench/redis_capacity.py
	$(PYTHON) bench/pipeline_latency.py
	$(PYTHON) bench/soak.py --jobs 300 --workers 4 --seed 42
	$(PYTHON) bench/cost_sim.py
	$(PYTHON) bench/cost.py --traces steady:3,bursty:3

## clean: remove what runs and tests created (var/, caches); keeps .venv (remove it with `rm -rf .venv`)
clean:
	rm -rf var .pytest_cache .ruff_cache .hypothesis c3_render.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	@echo "removed var/ and the caches; kept .venv ($$(du -sh $(VENV) 2>/dev/null | cut -f1 || echo absent)), .venv-gradio5 and .env if present"
