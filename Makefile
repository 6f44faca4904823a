# c3-render: the two commands of the README, and a few more.
PYTHON ?= python3
export PYTHON

.PHONY: run test test-fast lint soak bench clean

## run: install what is missing, then start Redis, the dev node, the API and a worker (Ctrl-C stops all)
run:
	bash scripts/install-deps.sh run
	bash scripts/run-local.sh

## test: install what is missing, then lint and run every test (end-to-end and a small soak included)
test:
	bash scripts/install-deps.sh dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -p no:cacheprovider

## test-fast: the tests without the end-to-end and soak suites
test-fast:
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "not e2e and not soak"

lint:
	$(PYTHON) -m ruff check .

## soak: the full soak test (a few hundred jobs with crashes and outages); prints the table
soak:
	$(PYTHON) bench/soak.py --jobs 300 --workers 3 --seed 42

## bench: every benchmark under bench/ (about 10 minutes); bench/README.md has their last figures
bench:
	$(PYTHON) bench/queue_scale.py
	$(PYTHON) bench/submit_throughput.py
	$(PYTHON) bench/worker_memory.py
	$(PYTHON) bench/soak.py --jobs 300 --workers 3 --seed 42

clean:
	rm -rf var/work var/output var/redis var/devnode-data
