# ticketbooth: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra flags for `make run`, e.g. make run ARGS="--tickets 1000"
ARGS ?=
# `make run` keeps its tickets in a durable SQLite file under ./data/ (TICKETBOOTH_STORE or
# a --store flag in ARGS wins).
RUN_STORE := $(or $(TICKETBOOTH_STORE),sqlite:///data/tickets.db)

# The tests start a throwaway PostgreSQL server from Debian's server binaries.
PG_INITDB_GLOB ?= /usr/lib/postgresql/*/bin/initdb

.PHONY: run test lint typecheck clean demo postgres-server browser-deps container-deps \
	container-test wrk bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps record what is installed; they are redone when pyproject.toml changes.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[load]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[load,test,dev]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	TICKETBOOTH_STORE='$(RUN_STORE)' $(BIN)/ticketbooth serve $(ARGS)

# Installs Debian's postgresql package only when no server binaries are there.
postgres-server:
	@if ! ls $(PG_INITDB_GLOB) >/dev/null 2>&1; then \
		echo "PostgreSQL server binaries missing ($(PG_INITDB_GLOB)): installing Debian's postgresql"; \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; \
	fi

# wrk (the HTTP benchmarking tool) from Debian's packages, only when missing: make bench
# uses it, and make test runs a one-second smoke of the bench.
wrk:
	@if ! command -v wrk >/dev/null 2>&1; then \
		echo "wrk missing: installing Debian's wrk"; \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk; \
	fi

test: $(VENV)/.installed-test postgres-server browser-deps wrk
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not container"
	$(MAKE) container-test

# The status page's browser test drives Debian's Chromium (never a browser download of a
# test tool's own). Needs root; installs only when /usr/bin/chromium is missing.
browser-deps:
	@test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# The image, built and run for real with podman, and compose.yaml's scale-out profile run with
# podman-compose (tests/container). Needs root: podman and friends come from Debian's packages
# when missing; podman's config, storage and the locally made images live in .cache/container/.
container-deps:
	$(PYTHON) tests/container/podman_engine.py install

container-test: $(VENV)/.installed-test container-deps
	$(BIN)/python -m pytest -m container tests/container

# The lesson over HTTP: the default load test against the real store (all checks pass)
# and against the unsafe one (the checks catch it), then SQLite killed, stopped and paused
# (all checks pass) and the memory store killed (the checks catch it); about a minute;
# succeeds when all four go as expected.
demo: $(VENV)/.installed-run
	$(BIN)/python -m loadtest.demo

# The benchmark (python -m bench; about 5 minutes, see docs/performance.md): every store
# against a bare WSGI hello and a Flask hello on the same waitress settings; results in
# bench-results/.
# Extra flags in BENCH_ARGS, e.g. make bench BENCH_ARGS="--only memory sqlite --repeat 5".
BENCH_ARGS ?=
bench: $(VENV)/.installed-run wrk postgres-server
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy app loadtest bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
