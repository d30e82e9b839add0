"""Crash safety: SIGKILL the server mid-batch; no acknowledged ticket is ever lost.

Runs against both durable stores, with keyed and keyless orders mixed in every batch. The
suite runs 5 kill cycles per store; set TICKETBOOTH_CRASH_CYCLES for a longer run.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from contextlib import closing
from functools import partial
from pathlib import Path

import psycopg
import pytest
import requests

from tests.conftest import Threads, poll, service_process, sold_on_record, store_url

CYCLES = int(os.environ.get("TICKETBOOTH_CRASH_CYCLES", "5"))
STOCK = 1_000_000
BUYERS = 8
ACKED_BEFORE_KILL = 150


def buy_until_killed(url: str, acked: list[int], enough: threading.Event, index: int) -> None:
    """Buy until the server stops answering; record every acknowledged serial. Every other
    buyer sends an Idempotency-Key, so batches mix keyed and keyless orders."""
    with requests.Session() as session:
        for _ in range(100_000):  # bounded; ends when the server is killed
            headers = {"Idempotency-Key": str(uuid.uuid4())} if index % 2 else {}
            try:
                response = session.post(f"{url}/buy", json={"quantity": 2}, headers=headers,
                                        timeout=10)
            except requests.RequestException:
                return
            assert response.status_code == 200, response.text
            acked.extend(ticket["serial"] for ticket in response.json()["tickets"])
            if len(acked) >= ACKED_BEFORE_KILL:
                enough.set()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_sigkill_never_loses_an_acknowledged_sale(kind: str, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    url = store_url(kind, tmp_path, request)
    store = ["--store", url, "--tickets", str(STOCK)]
    acknowledged: list[int] = []
    for _cycle in range(CYCLES):
        acked: list[int] = []
        enough = threading.Event()
        with service_process(*store) as service:
            buyers = Threads(partial(buy_until_killed, service.url, acked, enough), BUYERS)
            assert enough.wait(timeout=60), "buyers made no progress"
            service.process.kill()  # SIGKILL: no shutdown, no flush, mid-batch
            service.process.wait(timeout=10)
            buyers.join(timeout=30)
        acknowledged.extend(acked)

        with service_process(*store) as service:
            with requests.Session() as session:
                sold = session.get(f"{service.url}/remaining", timeout=5).json()["sold"]
                lost = [serial for serial in acked
                        if session.get(f"{service.url}/tickets/{serial}", timeout=5
                                       ).status_code != 200]
            assert service.stop() == 0
        assert not lost, f"acknowledged tickets lost: {lost[:10]}"
        # The service's count agrees with the sale rows counted by SQL; sales committed
        # whose answer was lost in the kill may exceed the acknowledged ones.
        assert sold_on_record(url) == sold >= len(acknowledged)
    assert len(set(acknowledged)) == len(acknowledged), "a serial was sold twice"


def hold_and_confirm_until_killed(url: str, holds: dict[str, int],
                                  confirmed: dict[str, list[int]], enough: threading.Event,
                                  index: int) -> None:
    """Create holds and confirm every other one until the server stops answering; record
    every 201 hold (with its ttl) and every confirmed ticket. The others are left to
    expire: a ttl of 1 s, or 600 s to stay held."""
    with requests.Session() as session:
        for turn in range(100_000):  # bounded; ends when the server is killed
            ttl = (1, 600, 600)[turn % 3]
            try:
                made = session.post(f"{url}/holds", json={"quantity": 2, "ttl_s": ttl},
                                    headers={"Idempotency-Key": str(uuid.uuid4())},
                                    timeout=10)
                assert made.status_code == 201, made.text
                hold_id = made.json()["id"]
                holds[hold_id] = ttl
                if ttl == 600 and (turn + index) % 2:
                    answer = session.post(f"{url}/holds/{hold_id}/confirm", timeout=10)
                    assert answer.status_code == 200, answer.text
                    confirmed[hold_id] = [ticket["serial"] for ticket in answer.json()["tickets"]]
            except requests.RequestException:
                return
            if len(confirmed) >= ACKED_BEFORE_KILL // 4:
                enough.set()


def held_by_sql(kind: str, url: str) -> tuple[int, int]:
    """Tickets in live holds by their rows (state held, not yet expired), and tickets in
    rows still marked held (expired or not); evidence from SQL."""
    if kind == "sqlite":
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            now = time.time()
            live, marked = db.execute(
                "SELECT coalesce(sum(quantity * (expires_at > ?)), 0), "
                "coalesce(sum(quantity), 0) FROM holds WHERE state = 'held'", (now,)
            ).fetchone()
            return int(live), int(marked)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(quantity) FILTER (WHERE expires_at > now()), 0), "
            "coalesce(sum(quantity), 0), (SELECT held FROM stock) "
            "FROM holds WHERE state = 'held'").fetchone()
        assert row is not None
        assert row[1] == row[2], "stock.held disagrees with the rows marked held"
        return int(row[0]), int(row[1])


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_sigkill_keeps_every_hold_and_confirmation(kind: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    url = store_url(kind, tmp_path, request)
    store = ["--store", url, "--tickets", str(STOCK)]
    holds: dict[str, int] = {}
    confirmed: dict[str, list[int]] = {}
    for _cycle in range(max(1, CYCLES // 2)):
        enough = threading.Event()
        with service_process(*store) as service:
            buyers = Threads(partial(hold_and_confirm_until_killed, service.url, holds,
                                     confirmed, enough), BUYERS)
            assert enough.wait(timeout=60), "buyers made no progress"
            service.process.kill()  # SIGKILL: mid-batch
            service.process.wait(timeout=10)
            buyers.join(timeout=30)

    serials = [serial for tickets in confirmed.values() for serial in tickets]
    assert len(set(serials)) == len(serials), "a serial was sold twice"
    with service_process(*store) as running, requests.Session() as session:
        service = running.url
        deadline = time.monotonic() + 30
        for hold_id, ttl in holds.items():  # every 201 hold is on record
            while True:
                hold = session.get(f"{service}/holds/{hold_id}", timeout=5)
                assert hold.status_code == 200, (hold_id, hold.text)
                state = hold.json()["state"]
                if hold_id in confirmed:
                    assert state == "confirmed", (hold_id, state)
                    tickets = [ticket["serial"] for ticket in hold.json()["tickets"]]
                    assert tickets == confirmed[hold_id]
                if ttl == 600:
                    assert state in ("held", "confirmed"), (hold_id, state)
                    break
                if state == "expired":
                    break
                assert state == "held", (hold_id, state)
                assert time.monotonic() < deadline, f"hold {hold_id} never expired"
                time.sleep(0.05)  # readiness poll: a 1 s hold runs out by the server's clock
        # A hold committed but not answered before the kill is on record too, unknown to
        # the test, and may run out meanwhile. Nothing is held any more, so the live holds
        # can only shrink: the server's count lies between two readings by SQL around it.
        before, _ = held_by_sql(kind, url)
        counts = session.get(f"{service}/remaining", timeout=5).json()
        after, _ = held_by_sql(kind, url)
        assert after <= counts["held"] <= before  # expired holds are back in the stock
        assert counts["sold"] == sold_on_record(url) >= len(serials)
        assert counts["remaining"] == STOCK - counts["sold"] - counts["held"]
        # And cleaned up in the background: no row still marked held has expired.
        poll(lambda: len(set(held_by_sql(kind, url))) == 1, "expired holds to be cleaned up",
             30)
        assert running.stop() == 0
