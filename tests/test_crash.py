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
from pathlib import Path

import psycopg
import pytest
import requests

from tests.conftest import server_process, store_url

CYCLES = int(os.environ.get("TICKETBOOTH_CRASH_CYCLES", "5"))
STOCK = 1_000_000
BUYERS = 8
ACKED_BEFORE_KILL = 150


def buy_until_killed(url: str, keyed: bool, acked: list[int], failures: list[str],
                     enough: threading.Event) -> None:
    """Buy until the server stops answering; record every acknowledged serial."""
    with requests.Session() as session:
        for _ in range(100_000):  # bounded; ends when the server is killed
            headers = {"Idempotency-Key": str(uuid.uuid4())} if keyed else {}
            try:
                response = session.post(f"{url}/buy", json={"quantity": 2}, headers=headers,
                                        timeout=10)
            except requests.RequestException:
                return
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text}")
                return
            acked.extend(ticket["serial"] for ticket in response.json()["tickets"])
            if len(acked) >= ACKED_BEFORE_KILL:
                enough.set()


def recorded_sales(kind: str, url: str) -> int:
    """Tickets the store's sale rows hold, counted by SQL: evidence the service did not
    derive from its own counters."""
    query = "SELECT coalesce(sum(count), 0) FROM sales"
    if kind == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return int(db.execute(query).fetchone()[0])
    with psycopg.connect(url) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_sigkill_never_loses_an_acknowledged_sale(kind: str, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    url = store_url(kind, tmp_path, request)
    store = ["--store", url, "--tickets", str(STOCK)]
    acknowledged: list[int] = []
    for _cycle in range(CYCLES):
        acked: list[int] = []
        failures: list[str] = []
        enough = threading.Event()
        with server_process(*store) as (process, service):
            buyers = [threading.Thread(target=buy_until_killed,
                                       args=(service, i % 2 == 0, acked, failures, enough))
                      for i in range(BUYERS)]
            for buyer in buyers:
                buyer.start()
            assert enough.wait(timeout=60), f"buyers made no progress: {failures[:3]}"
            process.kill()  # SIGKILL: no shutdown, no flush, mid-batch
            process.wait(timeout=10)
            for buyer in buyers:
                buyer.join(timeout=30)
        assert not failures, failures[:5]
        acknowledged.extend(acked)

        with server_process(*store) as (process, service):
            with requests.Session() as session:
                sold = session.get(f"{service}/remaining", timeout=5).json()["sold"]
                lost = [serial for serial in acked
                        if session.get(f"{service}/tickets/{serial}", timeout=5).status_code
                        != 200]
            process.terminate()
            assert process.wait(timeout=10) == 0
        assert not lost, f"acknowledged tickets lost: {lost[:10]}"
        # The service's count agrees with the sale rows; sales committed whose answer was
        # lost in the kill may exceed the acknowledged ones.
        assert sold == recorded_sales(kind, url)
        assert sold >= len(acknowledged)
    assert len(set(acknowledged)) == len(acknowledged), "a serial was sold twice"


def hold_and_confirm_until_killed(url: str, index: int, holds: dict[str, int],
                                  confirmed: dict[str, list[int]], failures: list[str],
                                  enough: threading.Event) -> None:
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
                if made.status_code != 201:
                    failures.append(f"{made.status_code} {made.text}")
                    return
                hold_id = made.json()["id"]
                holds[hold_id] = ttl
                if ttl == 600 and (turn + index) % 2:
                    answer = session.post(f"{url}/holds/{hold_id}/confirm", timeout=10)
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code} {answer.text}")
                        return
                    confirmed[hold_id] = [ticket["serial"] for ticket in answer.json()["tickets"]]
            except requests.RequestException:
                return
            if len(confirmed) >= ACKED_BEFORE_KILL // 4:
                enough.set()


def held_by_sql(kind: str, url: str) -> tuple[int, int]:
    """Tickets in live holds by their rows (state held, not yet expired), and tickets in
    rows still marked held (expired or not); evidence from SQL."""
    if kind == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
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
        failures: list[str] = []
        enough = threading.Event()
        with server_process(*store) as (process, service):
            buyers = [threading.Thread(target=hold_and_confirm_until_killed,
                                       args=(service, i, holds, confirmed, failures, enough))
                      for i in range(BUYERS)]
            for buyer in buyers:
                buyer.start()
            assert enough.wait(timeout=60), f"buyers made no progress: {failures[:3]}"
            process.kill()  # SIGKILL: mid-batch
            process.wait(timeout=10)
            for buyer in buyers:
                buyer.join(timeout=30)
        assert not failures, failures[:5]

    serials = [serial for tickets in confirmed.values() for serial in tickets]
    assert len(set(serials)) == len(serials), "a serial was sold twice"
    with server_process(*store) as (process, service), requests.Session() as session:
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
        counts = session.get(f"{service}/remaining", timeout=5).json()
        live, _ = held_by_sql(kind, url)
        assert counts["held"] == live  # expired holds are back in the stock
        assert counts["sold"] == recorded_sales(kind, url) >= len(serials)
        assert counts["remaining"] == STOCK - counts["sold"] - counts["held"]
        while held_by_sql(kind, url)[1] != live:  # and cleaned up in the background
            assert time.monotonic() < deadline + 30, "expired holds were never cleaned up"
            time.sleep(0.05)  # readiness poll
        process.terminate()
        assert process.wait(timeout=10) == 0
