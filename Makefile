# `make run` starts the service on its embedded defaults; `make test` runs every check.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-$(shell cat requirements.txt | sha1sum | cut -c1-12)
DEV := $(VENV)/.dev-$(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)
BENCH := $(VENV)/.bench-$(shell cat requirements-dev.txt requirements.txt requirements-bench.txt | sha1sum | cut -c1-12)
#: The modules mypy checks (the core of the payment path).
TYPED := payment_handler.py payment_states.py payment_results.py payment_client.py providers \
	deadline_watchdog.py refunds.py refund_store.py reconciliation.py provider_events.py event_store.py \
	connection_pool.py database_config.py payment_store.py settings.py money.py errors.py

.PHONY: run test test-fast lint types bench

$(RUNTIME): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.runtime-*
	touch $@

$(DEV): $(RUNTIME) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.dev-*
	touch $@

$(BENCH): $(DEV) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	rm -f $(VENV)/.bench-*
	touch $@

run: $(RUNTIME)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" scripts/quickstart.sh

lint: $(DEV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

types: $(DEV)
	$(PY) -m mypy $(TYPED)

# Lint, types and the unit tests (no processes, no sockets): seconds, run after every edit.
test-fast: lint types
	$(PY) -m pytest tests/unit

# Everything: lint, types and the whole suite against real processes (CI runs this).
test: lint types
	scripts/ensure_services.sh
	$(PY) -m pytest

bench: $(BENCH)
	scripts/ensure_services.sh
	$(PY) -m bench.run
