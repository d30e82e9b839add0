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
	container-test wrk bench lock floors

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every dependency comes from a lock file with hashes (make lock): requirements/run.txt for
# the service and the load generator (what the image has), requirements/dev.txt for all that
# plus matplotlib and the test and dev tools. pip checks every hash; the project then goes in
# alone (--no-deps), built with the locked setuptools. Stamps record what is installed, so a
# second make run or make test installs nothing; they are redone when a lock or
# pyproject.toml changes.
LOCK_RUN := requirements/run.txt
LOCK_DEV := requirements/dev.txt
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check

$(VENV)/.installed-run: $(LOCK_RUN) pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) --require-hashes -r $(LOCK_RUN)
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(LOCK_DEV) pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) --require-hashes -r $(LOCK_DEV)
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $@ $(VENV)/.installed-run

# Refreshes the lock files from pyproject.toml with pip-tools, keeping every pin that still
# fits; make lock LOCK_ARGS=--upgrade (or --upgrade-package NAME) moves pins too. run.txt is
# compiled from dev.txt's pins, so the two agree. tests/test_lock.py fails when
# pyproject.toml and the locks disagree.
LOCK_ARGS ?=
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --all-build-deps
lock: $(VENV)/.installed-test
	$(PIP_COMPILE) $(LOCK_ARGS) --extra postgres --extra plot --extra test --extra dev \
		--output-file $(LOCK_DEV) pyproject.toml
	cp $(LOCK_DEV) $(LOCK_RUN)
	$(PIP_COMPILE) --extra postgres --output-file $(LOCK_RUN) pyproject.toml

# The lowest versions pyproject.toml allows (requirements/floors.txt), in a venv of their own:
# the server's and the load generator's tests must pass there too. Not part of make test
# (it installs a second set of packages); run it after changing a floor or an internal use.
FLOORS_VENV := .venv-floors
FLOORS_TESTS := tests/loadtest tests/test_internals.py tests/test_api.py \
	tests/test_concurrency.py tests/test_stores.py tests/test_postgres.py tests/test_shutdown.py
floors: postgres-server
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet -c requirements/floors.txt \
		-r requirements/floors.txt pytest pytest-timeout
	$(FLOORS_VENV)/bin/python -m pip install --quiet --no-deps -e .
	@# --plot needs the plot extra, which the floors leave out.
	$(FLOORS_VENV)/bin/python -m pytest -p no:cacheprovider $(FLOORS_TESTS) \
		--deselect tests/loadtest/test_load_run.py::test_duration_and_plot

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

# The benchmark (python -m bench; about 6 minutes, see docs/performance.md): every store
# against a bare WSGI hello and a Flask hello on the same waitress settings; results in
# bench-results/.
# Extra flags in BENCH_ARGS, e.g. make bench BENCH_ARGS="--only memory sqlite --repeat 25".
BENCH_ARGS ?=
bench: $(VENV)/.installed-test wrk postgres-server
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy app loadtest bench

clean:
	rm -rf $(VENV) $(FLOORS_VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
