"""A shutdown whose grace period runs out answers every sale it commits.

The store's writer is held up (a lock taken on the SQLite file from outside) so that when the
grace period is over one sale is being committed and another is still queued: the queued one
is withdrawn unsold (503), the one being committed is committed and answered (200) before
the worker threads stop.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import requests

from app.api import create_app
from app.server import Server
from app.settings import Settings
from app.stores import open_store
from tests.conftest import wait_until_healthy


def poll(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # readiness poll


def test_grace_period_over_withdraws_queued_sales_and_answers_committed_ones(
        tmp_path: Path) -> None:
    path = tmp_path / "tickets.db"
    settings = Settings(store=f"sqlite:///{path}", tickets=10, host="127.0.0.1", port=0,
                        shutdown_timeout=0.2)
    store = open_store(settings)
    server = Server(settings, create_app(settings, store))
    serving = threading.Thread(target=server.serve, name="waitress", daemon=True)
    serving.start()
    answers: dict[str, requests.Response] = {}
    failures: list[str] = []

    def buy(name: str) -> None:
        try:
            answers[name] = requests.post(f"{server.url}/buy", timeout=30)
        except requests.RequestException as error:
            failures.append(f"{name}: {error}")

    buyers = [threading.Thread(target=buy, args=(name,)) for name in ("committing", "queued")]
    try:
        wait_until_healthy(server.url)
        orders = store._orders  # type: ignore[attr-defined]
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the writer's commit waits for this lock
        try:
            buyers[0].start()
            poll(lambda: orders.busy, "the writer to take the first sale")
            buyers[1].start()
            poll(lambda: orders.pending == 1, "the second sale to queue")
            server.stop()
            buyers[1].join(timeout=30)  # withdrawn once the grace period is over
        finally:
            blocker.execute("ROLLBACK")  # now the first sale commits
            blocker.close()
        buyers[0].join(timeout=30)
        serving.join(timeout=30)
        assert not serving.is_alive(), "the server did not stop"
    finally:
        server.stop()
        serving.join(timeout=30)
        store.close()
    assert not failures, failures
    committed, queued = answers["committing"], answers["queued"]
    assert committed.status_code == 200 and committed.json()["tickets"] == [{"serial": 1}]
    assert (queued.status_code, queued.json()["error"]) == (503, "store_unavailable")
    # On record, counted by SQL: exactly the answered sale.
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT first_serial, count FROM sales").fetchall() == [(1, 1)]
