"""Fixtures: a store of every kind, and a real waitress server on 127.0.0.1, port 0."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
import requests

from app.api import create_app
from app.inventory import Store
from app.server import Server
from app.settings import Settings, describe
from app.stores import open_store
from loadtest.spawn import ServiceProcess, running_service, service_command
from tests.support.pg import PostgresServer, PostgresUnavailable

# Every backend the shared store suite runs against.
STORE_KINDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(scope="session", autouse=True)
def hermetic_environment() -> Iterator[None]:
    """The service's TICKETBOOTH_* settings from the caller's shell never reach a test or
    the servers the tests start; tests set what they need explicitly."""
    inherited = {variable: os.environ.pop(variable)
                 for _flag, variable, _default, _help in describe()
                 if variable in os.environ}
    yield
    os.environ.update(inherited)


class FakeClock:
    """A clock the test moves by hand, for idempotency-key expiry."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest | None = None) -> str:
    if kind == "memory":
        return "memory"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'tickets.db'}"
    if kind == "postgres":
        # A fresh database per test in the session's server: started only when needed.
        assert request is not None, "postgres stores need the test's request"
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server.new_database()
    raise ValueError(kind)


@contextmanager
def postgres(*, durable: bool) -> Iterator[PostgresServer]:
    """A started throwaway PostgreSQL server; fails the test loudly when it cannot be had
    (missing server binaries are a failure with the reason, never a skip)."""
    server: PostgresServer | None = None
    reason = ""
    try:
        server = PostgresServer(durable=durable)
        server.start()
    except PostgresUnavailable as error:
        reason = str(error)
    try:
        if server is None or reason:
            pytest.fail(reason, pytrace=False)
        yield server
    finally:
        if server is not None:
            server.remove()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (fsync off); tests take a database each."""
    with postgres(durable=False) as server:
        yield server


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Stores:
    """Opens stores of one kind; everything opened is closed at teardown."""

    def __init__(self, kind: str, tmp_path: Path,
                 request: pytest.FixtureRequest | None = None) -> None:
        self.kind = kind
        self.url = store_url(kind, tmp_path, request)
        self.opened: list[Store] = []

    def settings(self, tickets: int = 100, **overrides: Any) -> Settings:
        return Settings(**{"store": self.url, "tickets": tickets, **overrides})

    def open(self, settings: Settings, clock: Callable[[], float] | None = None) -> Store:
        store = open_store(settings, clock=clock) if clock else open_store(settings)
        self.opened.append(store)
        return store

    def __call__(self, tickets: int = 100, clock: Callable[[], float] | None = None,
                 **overrides: Any) -> Store:
        return self.open(self.settings(tickets, **overrides), clock)

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture
def make_store(store_kind: str, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[Stores]:
    """``make_store(tickets, clock=None, **settings)`` opens a store of each kind in turn."""
    stores = Stores(store_kind, tmp_path, request)
    yield stores
    stores.close_all()


class Threads:
    """``target(i)`` (or ``target()``) in ``count`` threads, started at once.

    What a thread raises (a failed assertion, say) is kept, and :meth:`join` raises the
    first of them in the test itself, so that it fails the test (never only a warning).
    """

    def __init__(self, target: Callable[..., Any], count: int, *, indexed: bool = True
                 ) -> None:
        self.failures: list[BaseException] = []

        def run(*args: Any) -> None:
            try:
                target(*args)
            except BaseException as error:  # handed to the test in join()
                self.failures.append(error)

        self._threads = [threading.Thread(target=run, args=(i,) if indexed else ())
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "threads did not finish in time"
        if self.failures:
            raise AssertionError(f"{len(self.failures)} of {len(self._threads)} threads "
                                 f"failed; the first: {self.failures[0]!r}"
                                 ) from self.failures[0]


def run_threads(target: Callable[..., Any], count: int, *, indexed: bool = True,
                timeout: float = 120.0) -> None:
    """Run ``target(i)`` (or ``target()``) in ``count`` threads at once; all must finish,
    and what any of them raised fails the test."""
    Threads(target, count, indexed=indexed).join(timeout)


def sold_on_record(store: str | Path) -> int:
    """Tickets in the sale rows of a SQLite file (a path or a sqlite:/// URL) or a PostgreSQL
    database (its URL), counted by SQL: evidence the store did not derive."""
    query = "SELECT coalesce(sum(count), 0) FROM sales"
    if isinstance(store, Path) or store.startswith("sqlite:///"):
        path = store if isinstance(store, Path) else Path(store.removeprefix("sqlite:///"))
        with closing(sqlite3.connect(path)) as db:
            return int(db.execute(query).fetchone()[0])
    import psycopg

    with psycopg.connect(store) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])


def wait_until_healthy(url: str, timeout: float = 10.0) -> None:
    """Poll /healthz until it answers 200 (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout} s")
        time.sleep(0.02)


@contextmanager
def serving(settings: Settings, store: Store,
            app_clock: Callable[[], float] = time.time) -> Iterator[str]:
    """Run a real waitress server in a thread on a free loopback port; yield its URL."""
    server = Server(settings.replace(host="127.0.0.1", port=0),
                    create_app(settings, store, app_clock))
    thread = threading.Thread(target=server.serve, name="waitress", daemon=True)
    thread.start()
    try:
        wait_until_healthy(server.url)
        yield server.url
    finally:
        server.stop()
        thread.join(timeout=15)
        assert not thread.is_alive(), "server did not stop"


@pytest.fixture
def live_server(make_store: Stores) -> Callable[..., Any]:
    """``live_server(tickets=..., app_clock=..., **settings)`` is a context manager yielding
    a base URL; ``app_clock`` is the clock of the app's sales figures."""

    def start(tickets: int = 100, app_clock: Callable[[], float] = time.time,
              **overrides: Any) -> Any:
        settings = make_store.settings(tickets, **overrides)
        return serving(settings, make_store.open(settings), app_clock)

    return start


@contextmanager
def service_process(*argv: str, stderr: IO[str] | int | None = None, ready: bool = True,
                    cwd: Path | None = None) -> Iterator[ServiceProcess]:
    """``python -m app serve --host 127.0.0.1 --port 0 ARGV`` as a subprocess: the one way
    the tests start a service process, the load generator's own (loadtest.spawn).

    Yields once it listens (and, with ``ready``, answers /healthz); its stdout and stderr
    are always read (stderr goes to ``stderr`` when given, else to the test's), so it never
    blocks on a full pipe. It is stopped when the block ends, however the test ends.
    """
    with running_service(service_command(argv), stderr=stderr, cwd=cwd) as service:
        if ready:
            wait_until_healthy(service.url)
        yield service


@contextmanager
def delay_proxy(target: str, delay_ms: float, logs: Path) -> Iterator[tuple[int, int]]:
    """The bench's delay proxy, its own process as the bench runs it, forwarding to
    ``target`` (HOST:PORT) with every chunk ``delay_ms`` late each way; yields its port on
    127.0.0.1 and its pid, and stops it however the block ends."""
    from bench.load import port_of
    from bench.procs import ServerProcess

    proxy = ServerProcess("delayproxy", [
        sys.executable, "-m", "bench.delayproxy", "--target", target,
        "--delay-ms", str(delay_ms)], logs)
    proxy.start()
    try:
        port = port_of(proxy.wait_listening())
        assert proxy.proc is not None
        yield port, proxy.proc.pid
    finally:
        proxy.stop()


def run_cli(*argv: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``python -m app ARGV`` to its end, for starts that must fail (bounded)."""
    return subprocess.run([sys.executable, "-m", "app", *argv], capture_output=True, text=True,
                          timeout=30, check=False, env={**os.environ, **(env or {})})


def poll(condition: Callable[[], object], what: str, timeout: float = 10.0) -> float:
    """Poll ``condition()`` every 20 ms until it is true (bounded); the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling interval, not synchronisation
    return time.monotonic() - started


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by Playwright (tests/browser.py), one per module."""
    from playwright.sync_api import sync_playwright

    from tests.browser import launch_chromium

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()
