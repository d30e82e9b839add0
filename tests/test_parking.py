"""Parked requests (app.parking): a durable sale does not hold a worker thread.

On SQLite and PostgreSQL, a POST /buy is handed to the group-commit writer and its worker
moves on; the request runs again, and is answered, once its commit is durable.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import pytest
import requests

from app.inventory import Outcome, Sale, StoreUnavailable
from app.settings import Settings
from app.stores import open_store
from app.stores.sqlite import SqliteStore
from tests.conftest import run_threads, serving, store_url


def sqlite_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(**{"store": f"sqlite:///{tmp_path / 'tickets.db'}", **overrides})


def read_response(stream: BinaryIO) -> tuple[int, bytes]:
    """One HTTP/1.1 response from a buffered socket file: status and body."""
    status_line = stream.readline()
    status = int(status_line.split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


@pytest.mark.parametrize("keyed", [False, True], ids=["keyless", "keyed"])
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_one_worker_thread_commits_concurrent_sales_together(
        kind: str, keyed: bool, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """With --threads 1, a worker that waited for each commit could never batch two sales.

    Serials sold in one commit share its time, so a shared sold_at proves a batch held
    orders from requests that the single worker had parked.
    """
    settings = Settings(store=store_url(kind, tmp_path, request), tickets=1_000, threads=1)
    store = open_store(settings)
    try:
        with serving(settings, store) as url:
            serials: list[int] = []
            failures: list[str] = []

            def booth() -> None:
                with requests.Session() as session:
                    for _ in range(8):
                        headers = {"Idempotency-Key": str(uuid.uuid4())} if keyed else {}
                        answer = session.post(f"{url}/buy", headers=headers, timeout=30)
                        if answer.status_code != 200:
                            failures.append(answer.text)
                            return
                        serials.extend(t["serial"] for t in answer.json()["tickets"])

            run_threads(booth, 16, indexed=False)
            assert not failures, failures[:3]
            assert sorted(serials) == list(range(1, 129))
            with requests.Session() as session:
                times = Counter(session.get(f"{url}/tickets/{serial}", timeout=5)
                                .json()["sold_at"] for serial in serials)
            assert max(times.values()) > 1, "every sale had a commit of its own"
            assert requests.get(f"{url}/remaining", timeout=5).json()["sold"] == 128
    finally:
        store.close()


def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path, tickets=100)
    store = open_store(settings)
    try:
        with serving(settings, store) as url:
            port = int(url.rsplit(":", 1)[1])
            body = b'{"quantity": 2}'
            one = b"POST /buy HTTP/1.1\r\nHost: booth\r\nContent-Length: 0\r\n\r\n"
            two = (b"POST /buy HTTP/1.1\r\nHost: booth\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(one + two + one + b"GET /remaining HTTP/1.1\r\nHost: b\r\n\r\n")
                stream = client.makefile("rb")
                answers = [read_response(stream) for _ in range(4)]
            assert [status for status, _ in answers] == [200, 200, 200, 200]
            assert answers[0][1] == b'{"tickets":[{"serial":1}],"remaining":99}'
            assert answers[1][1] == b'{"tickets":[{"serial":2},{"serial":3}],"remaining":97}'
            assert answers[2][1] == b'{"tickets":[{"serial":4}],"remaining":96}'
            assert answers[3][1] == b'{"remaining":96,"sold":4,"held":0,"total":100}'
    finally:
        store.close()


def test_clients_that_leave_while_parked_break_nothing(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path, tickets=100, threads=2)
    store = open_store(settings)
    try:
        with serving(settings, store) as url:
            port = int(url.rsplit(":", 1)[1])
            for _ in range(20):  # ask, and hang up before the answer can come
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    client.sendall(b"POST /buy HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n")
            after = requests.post(f"{url}/buy", timeout=10)
            assert after.status_code == 200
            counts = requests.get(f"{url}/remaining", timeout=5).json()
            # Whatever the leavers bought was committed whole; this buyer got the next one.
            assert after.json()["tickets"] == [{"serial": counts["sold"]}]
            # The count agrees with the serials looked up one by one: all of 1..sold are
            # sold, and the next is not.
            for serial in range(1, counts["sold"] + 1):
                assert requests.get(f"{url}/tickets/{serial}", timeout=5).status_code == 200
            assert requests.get(f"{url}/tickets/{counts['sold'] + 1}",
                                timeout=5).status_code == 404
    finally:
        store.close()


def test_sell_later_tells_the_outcome_once_it_is_committed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "tickets.db", 3)
    outcomes: list[Outcome] = []
    told = threading.Semaphore(0)

    def done(outcome: Outcome) -> None:
        outcomes.append(outcome)
        told.release()

    try:
        store.sell_later(2, None, done)
        store.sell_later(2, None, done)  # only 1 left after the first
        for _ in range(2):
            assert told.acquire(timeout=10)
        first, second = outcomes
        assert first == Sale(range(1, 3), 1)
        assert isinstance(second, Exception) and "only 1 remain" in str(second)
        # Committed before it was told: another connection to the file sees the sale.
        assert store.sold_at(2) is not None
    finally:
        store.close()
    with pytest.raises(StoreUnavailable):
        store.sell_later(1, None, done)
