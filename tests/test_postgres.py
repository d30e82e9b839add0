"""What only the PostgreSQL store promises: several processes, restarts, a database outage.

Everything here runs against a real throwaway PostgreSQL server (tests/support/pg.py) and real
``python -m app serve`` processes talking HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import requests

from app.inventory import DeferringStore, SoldOut
from app.settings import Settings
from app.stores import StoreSetupError, open_store
from loadtest.spawn import ServiceProcess
from tests.conftest import (
    FakeClock,
    delay_proxy,
    poll,
    postgres,
    run_cli,
    run_threads,
    service_process,
    sold_on_record,
)
from tests.support.pg import PostgresServer, free_port


def settings(url: str, tickets: int = 100, **overrides: object) -> Settings:
    return Settings(**{"store": url, "tickets": tickets, **overrides})  # type: ignore[arg-type]


# -- a database far away: pipelined batches ---------------------------------------------


@contextmanager
def far_away(url: str, delay_ms: float, logs: Path) -> Iterator[str]:
    """``url`` reached through the bench's delay proxy: every chunk ``delay_ms`` late
    each way, as across a network."""
    parts = psycopg.conninfo.conninfo_to_dict(url)
    with delay_proxy(f"{parts['host']}:{parts['port']}", delay_ms, logs) as (port, _):
        yield url.replace(f":{parts['port']}/", f":{port}/")


def test_batches_to_a_far_database_are_pipelined_and_sell_each_ticket_once(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    """Through a 2 ms delay each way, batches leave while others are on their way (on
    other connections of the one process), and the stock row's lock still orders them:
    every ticket sold once, serials 1..N, the stock sold out exactly. The lesson's chore
    (inside the lock, per sale) keeps each batch in the database long enough that the
    next one arrives while it is there."""
    total = 3000
    url = postgres_server.new_database()
    with far_away(url, 2.0, tmp_path) as far:
        store = open_store(settings(far, total, chore_ms=0.1))
        serials: list[list[int]] = [[] for _ in range(32)]
        deadline = time.monotonic() + 60

        def buy(index: int) -> None:
            while time.monotonic() < deadline:
                try:
                    serials[index].extend(store.sell(1 + index % 2).serials)
                except SoldOut:
                    return

        try:
            run_threads(buy, 32, timeout=90)
            assert isinstance(store, DeferringStore)
            pipelined = store.commit_stats().pipelined
            counts = store.counts()
        finally:
            store.close()
    sold = sorted(s for mine in serials for s in mine)
    assert pipelined > 0, "no batch left while another was on its way"
    assert sold == list(range(1, total + 1))  # each once, no gap, sold out exactly
    assert counts.sold == total and sold_on_record(url) == total


# -- the store, opened twice (as two service processes would) --------------------------


def test_state_survives_a_restart_and_postgres_scheme_is_accepted(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    first = open_store(settings(url, 10))
    try:
        assert list(first.sell(3, "k").serials) == [1, 2, 3]
        first.restock(5)
    finally:
        first.close()
    again = open_store(settings(url.replace("postgresql://", "postgres://"), 10))
    try:
        counts = again.counts()
        assert (counts.total, counts.sold) == (15, 3)
        assert again.sell(3, "k").replayed
        assert again.sold_at(3) is not None and again.sold_at(4) is None
    finally:
        again.close()


def test_a_different_tickets_than_the_database_holds_is_refused(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    store = open_store(settings(url, 10))
    store.restock(5)  # the stock it was created with still counts, not the total now
    store.close()
    with pytest.raises(StoreSetupError, match="created with --tickets 10, not 20; refusing"):
        open_store(settings(url, 20))
    with pytest.raises(StoreSetupError, match="created with --tickets 10, not 15; refusing"):
        open_store(settings(url, 15))
    open_store(settings(url, 10)).close()


def test_instances_starting_at_once_create_the_schema_once(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    start = threading.Barrier(6)
    opened: list[object] = []

    def open_one() -> None:
        start.wait()
        opened.append(open_store(settings(url, 50, pool_size=2)))

    try:
        run_threads(open_one, 6, indexed=False, timeout=30)
        assert len(opened) == 6
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT initial, total, sold FROM stock").fetchall() == [
                (50, 50, 0)]
    finally:
        for store in opened:
            store.close()  # type: ignore[attr-defined]


def test_one_key_sent_to_two_instances_at_once_sells_once(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    # The slow chore keeps the winner's transaction open while the others arrive.
    stores = [open_store(settings(url, 100, chore_ms=100, pool_size=4)) for _ in range(2)]
    start = threading.Barrier(8)
    sales: list[object] = []

    def buy(index: int) -> None:
        start.wait()
        sales.append(stores[index % 2].sell(3, "same-key"))

    try:
        run_threads(buy, 8, timeout=30)
        assert len(sales) == 8
        assert {tuple(sale.serials) for sale in sales} == {(1, 2, 3)}  # type: ignore[attr-defined]
        assert sum(not sale.replayed for sale in sales) == 1  # type: ignore[attr-defined]
        assert stores[0].counts().sold == stores[1].counts().sold == 3
    finally:
        for store in stores:
            store.close()


def test_expired_receipts_are_replaced_and_purged(postgres_server: PostgresServer) -> None:
    url = postgres_server.new_database()
    clock = FakeClock()
    store = open_store(settings(url, 10, idempotency_ttl=100), clock=clock)
    try:
        store.sell(1, "a")
        with pytest.raises(SoldOut):
            store.sell(20, "b")
        clock.advance(101)
        store.sell(1, "c")  # purges what expired
        with psycopg.connect(url) as conn:
            keys = [row[0] for row in conn.execute("SELECT key FROM receipts ORDER BY key")]
        assert keys == ["c"]
        assert not store.sell(1, "a").replayed  # forgotten: a new sale
        assert store.counts().sold == 3
    finally:
        store.close()


def test_a_batch_finds_its_keys_by_the_index_once_receipts_have_grown(
        postgres_server: PostgresServer) -> None:
    """A connection sells keyed batches while receipts is small (a new database), then
    receipts grows twenty-thousandfold with no ANALYZE from autovacuum: the store analyzes
    it, so that connection's next keyed batch finds its keys by the primary key instead of
    scanning the table with the plan it cached while the table was small (54 ms a batch at
    60,000 receipts)."""
    url = postgres_server.new_database()
    store = open_store(settings(url, 10**9))
    sell = ("SELECT count(*) FROM ticketbooth_sell(NULL, %s, %s, NULL, NULL, now(), "
            "now() - interval '1 day', 0)")
    quantities = "{" + ",".join(["1"] * 40) + "}"

    def keys() -> list[str]:
        return [uuid.uuid4().hex for _ in range(40)]

    def analyzed() -> bool:  # by a client (the store), not by autovacuum
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT analyze_count FROM pg_stat_user_tables "
                               "WHERE relname = 'receipts'").fetchone()
        return row is not None and row[0] >= 1

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(10):  # past the plan cache's five custom plans
                conn.execute(sell, (quantities, keys()))
            conn.execute("INSERT INTO receipts (key, quantity, first_serial, count, "
                         "remaining, created) SELECT 'grown-' || i, 1, NULL, 0, 0, now() "
                         "FROM generate_series(1, 20000) AS i")
            # The store looks at the table's size every few seconds, idle or not.
            poll(analyzed, "the store to analyze receipts", 30)
            # This backend's scans of receipts not yet reported (inside one transaction
            # block nothing is reported meanwhile), before and after one more keyed batch.
            scans = ("SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables "
                     "WHERE relname = 'receipts'")
            with conn.transaction():
                before = conn.execute(scans).fetchone()
                sold = conn.execute(sell, (quantities, keys())).fetchone()
                after = conn.execute(scans).fetchone()
    finally:
        store.close()
    assert sold == (40,) and before is not None and after is not None
    seq_scans, index_scans = after[0] - before[0], after[1] - before[1]
    assert seq_scans == 0 and index_scans >= 1, (before, after)


def test_sold_at_beyond_bigint_is_not_sold(postgres_server: PostgresServer) -> None:
    store = open_store(settings(postgres_server.new_database(), 5))
    try:
        store.sell(5)
        assert store.sold_at(10**30) is None and store.sold_at(2**63) is None
    finally:
        store.close()


# -- real service processes -------------------------------------------------------------


@contextmanager
def service(url: str, log: Path, *argv: str) -> Iterator[ServiceProcess]:
    """A service process on the database at ``url``, its stderr in ``log``; yields once
    it is healthy."""
    with log.open("w") as log_file, service_process("--store", url, *argv,
                                                    stderr=log_file) as instance:
        yield instance


def test_cli_refuses_a_changed_stock_and_an_unreachable_database(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    url = postgres_server.new_database()
    with service(url, tmp_path / "first.log", "--tickets", "30"):
        pass
    changed = run_cli("serve", "--port", "0", "--store", url, "--tickets", "40")
    assert changed.returncode == 2
    database = url.rsplit("/", 1)[1]
    assert changed.stderr.strip().splitlines() == [
        f"ticketbooth: error: the database at 127.0.0.1:{postgres_server.port}/{database} was "
        "created with --tickets 30, not 40; refusing to change the stock of an existing "
        "database"]
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    unreachable = run_cli("serve", "--port", "0", "--store", nowhere)
    assert unreachable.returncode == 2
    lines = unreachable.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "ticketbooth: error: cannot reach PostgreSQL at 127.0.0.1:"), unreachable.stderr


@pytest.mark.parametrize("url", [
    "postgresql://%zz",
    "postgresql://postgres@[::1/db",
    "postgresql://postgres@127.0.0.1:1/db?nosuchparam=1",
])
def test_a_malformed_url_stops_the_cli_with_one_line(url: str) -> None:
    result = run_cli("serve", "--port", "0", "--store", url)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "ticketbooth: error: invalid PostgreSQL URL: "), result.stderr


def load_generator() -> list[str]:
    """The ``ticketbooth-load`` console script of this environment (``-m loadtest`` else)."""
    script = Path(sys.executable).with_name("ticketbooth-load")
    return [str(script)] if script.exists() else [sys.executable, "-m", "loadtest"]


@pytest.mark.parametrize("keyed", [False, True], ids=["keyless", "keyed"])
@pytest.mark.parametrize("count", [2, 3])
def test_instances_sell_the_stock_once_under_ticketbooth_load(
        postgres_server: PostgresServer, tmp_path: Path, count: int, keyed: bool) -> None:
    """Scale-out: processes on one database, ticketbooth-load with one --url each, its
    purchases keyless or each with a key of its own (--idempotent, checks 5 and 6 too)."""
    stock = 1200
    url = postgres_server.new_database()
    with ExitStack() as stack:
        # All start at once against an empty database: the schema race is real.
        instances = [stack.enter_context(service(url, tmp_path / f"booth-{i}.log",
                                                 "--tickets", str(stock), "--threads", "4"))
                     for i in range(count)]
        urls = [instance.url for instance in instances]

        # An Idempotency-Key is honoured by every instance, not only the one that sold.
        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = requests.post(f"{urls[0]}/buy", headers=key, timeout=10)
        assert first.status_code == 200 and first.json()["tickets"] == [{"serial": 1}]
        again = requests.post(f"{urls[1]}/buy", headers=key, timeout=10)
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        other = requests.post(f"{urls[-1]}/buy", headers=key, json={"quantity": 2}, timeout=10)
        assert other.status_code == 422

        result_path = tmp_path / "load.json"
        load = subprocess.run(
            [*load_generator(), *(arg for u in urls for arg in ("--url", u)),
             "--booths", "12", "--json", str(result_path), "--quiet",
             *(["--idempotent"] if keyed else [])],
            capture_output=True, text=True, timeout=120, check=False)
        assert load.returncode == 0, load.stdout + load.stderr
        result = json.loads(result_path.read_text())
        checks = {check["name"]: check["passed"] for check in result["checks"]}
        assert len(checks) == (6 if keyed else 4) and all(checks.values()), result["checks"]
        assert result["remaining_before"] == {"remaining": stock - 1, "sold": 1, "held": 0,
                                              "total": stock}
        assert result["remaining_after"] == {"remaining": 0, "sold": stock, "held": 0,
                                             "total": stock}
        assert result["tickets_acknowledged"] == stock - 1
        assert result["tickets_unknown"] == 0 and result["error_rate"] == 0
        sold_by = {u: sum(b["tickets"] for b in result["booths"] if b["url"] == u)
                   for u in urls}
        assert all(sold_by.values()), f"every instance sells: {sold_by}"

        for instance_url in urls:  # every instance agrees on the shared stock
            assert requests.get(f"{instance_url}/remaining", timeout=10).json() == {
                "remaining": 0, "sold": stock, "held": 0, "total": stock}
            assert requests.get(f"{instance_url}/tickets/{stock}", timeout=10).status_code == 200


def test_holds_over_two_service_processes(postgres_server: PostgresServer,
                                          tmp_path: Path) -> None:
    """A hold made on one process is confirmed on the other; a confirm on one and a
    release on the other, sent at once, have one outcome."""
    url = postgres_server.new_database()
    with ExitStack() as stack:
        one, other = (stack.enter_context(service(url, tmp_path / f"booth-{i}.log",
                                                  "--tickets", "50")).url
                      for i in range(2))
        hold = requests.post(f"{one}/holds", json={"quantity": 3}, timeout=10).json()
        confirmed = requests.post(f"{other}/holds/{hold['id']}/confirm", timeout=10)
        assert confirmed.status_code == 200
        assert confirmed.json()["tickets"] == [{"serial": s} for s in (1, 2, 3)]
        shown = requests.get(f"{one}/holds/{hold['id']}", timeout=10).json()
        assert shown["state"] == "confirmed" and shown["tickets"] == confirmed.json()["tickets"]

        raced = [requests.post(f"{one}/holds", json={"quantity": 1}, timeout=10).json()["id"]
                 for _ in range(10)]
        answers: dict[str, list[int]] = {hold_id: [] for hold_id in raced}
        barrier = threading.Barrier(2)

        def settle(index: int) -> None:
            barrier.wait()
            with requests.Session() as session:
                for hold_id in raced:
                    if index == 0:
                        answer = session.post(f"{one}/holds/{hold_id}/confirm", timeout=10)
                    else:
                        answer = session.delete(f"{other}/holds/{hold_id}", timeout=10)
                    answers[hold_id].append(answer.status_code)

        run_threads(settle, 2)
        for hold_id, statuses in answers.items():  # one wins; the other is told why not
            assert sorted(statuses) in ([200, 409], [204, 409]), (hold_id, statuses)
        won = sum(200 in statuses for statuses in answers.values())
        for instance in (one, other):
            assert requests.get(f"{instance}/remaining", timeout=10).json() == {
                "remaining": 50 - 3 - won, "sold": 3 + won, "held": 0, "total": 50}


def test_mixed_quantities_over_two_instances_sell_every_serial_once(
        postgres_server: PostgresServer, tmp_path: Path) -> None:
    """Round-robin per request, 1 to 4 tickets each, down to the last ticket: all or nothing
    holds across processes, and the union of what was handed out is exactly 1..stock."""
    stock, clients = 600, 8
    url = postgres_server.new_database()
    with ExitStack() as stack:
        urls = [stack.enter_context(service(url, tmp_path / f"booth-{i}.log",
                                            "--tickets", str(stock), "--threads", "4")).url
                for i in range(2)]
        bought: list[list[int]] = [[] for _ in range(clients)]
        failures: list[str] = []
        start = threading.Barrier(clients)

        def client(index: int) -> None:
            chooser = random.Random(index)
            quantity = chooser.randint(1, 4)
            with requests.Session() as session:
                start.wait()
                for turn in range(index, index + stock + 10):  # bounded: each pass sells or ends
                    response = session.post(f"{urls[turn % len(urls)]}/buy",
                                            json={"quantity": quantity}, timeout=30)
                    if response.status_code == 200:
                        bought[index].extend(t["serial"] for t in response.json()["tickets"])
                        quantity = chooser.randint(1, 4)
                    elif response.status_code == 409 and response.json()["remaining"] > 0:
                        quantity = 1  # fewer left than asked: nothing sold; take them singly
                    elif response.status_code == 409:
                        return
                    else:
                        failures.append(f"{response.status_code} {response.text}")
                        return
                failures.append("client did not finish")

        run_threads(client, clients)
        assert not failures, failures
        sold = sorted(serial for serials in bought for serial in serials)
        assert sold == list(range(1, stock + 1)), "oversold, duplicated or lost"
        for instance_url in urls:
            assert requests.get(f"{instance_url}/remaining", timeout=10).json() == {
                "remaining": 0, "sold": stock, "held": 0, "total": stock}


# -- the database goes away and comes back ----------------------------------------------


@dataclass
class Buyers:
    """Buying clients that retry each purchase with its Idempotency-Key until it is answered."""

    url: str
    deadline: float
    acknowledged: list[int] = field(default_factory=list)  # serials answered 200
    purchases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    unavailable: list[tuple[dict[str, object], str | None]] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def buy_one(self, session: requests.Session) -> None:
        key = str(uuid.uuid4())
        while time.monotonic() < self.deadline:
            try:
                response = session.post(f"{self.url}/buy", headers={"Idempotency-Key": key},
                                        timeout=15)
            except requests.ConnectionError as error:
                self.errors.append(f"connection error: {error}")
                time.sleep(0.05)  # retry pacing
                continue
            with self.lock:
                self.statuses[response.status_code] = (
                    self.statuses.get(response.status_code, 0) + 1)
            if response.status_code == 200:
                serials = [t["serial"] for t in response.json()["tickets"]]
                with self.lock:
                    self.acknowledged.extend(serials)
                    self.purchases += 1
                return
            if response.status_code == 503:
                with self.lock:
                    self.unavailable.append((response.json(),
                                             response.headers.get("Retry-After")))
            elif (response.status_code, response.json()["error"]) not in (
                    (409, "idempotency_key_in_flight"), (504, "outcome_unknown")):
                self.errors.append(f"{response.status_code} {response.text}")
                return
            time.sleep(0.05)  # retry pacing, as a polite client would (Retry-After: 1)
        self.unfinished.append(key)

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                self.buy_one(session)
                time.sleep(0.01)  # pacing: keep the volume modest on a shared machine

    def count(self) -> int:
        with self.lock:
            return self.purchases


def status_of(url: str) -> int:
    try:
        return requests.get(url, timeout=10).status_code
    except requests.ConnectionError:
        return 0


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this module's own, with default durability: these tests stop it."""
    with postgres(durable=True) as server:
        yield server


def test_stale_connections_after_a_restart_cost_no_request(own_postgres: PostgresServer) -> None:
    url = own_postgres.new_database()
    store = open_store(settings(url, 100, pool_size=4, chore_ms=50))
    try:
        start = threading.Barrier(4)

        def buy() -> None:
            start.wait()
            store.sell(1)

        run_threads(buy, 4, indexed=False, timeout=30)
        with psycopg.connect(url) as conn:
            pooled = conn.execute("SELECT count(*) FROM pg_stat_activity "
                                  "WHERE application_name = 'ticketbooth'").fetchone()
        assert pooled is not None and pooled[0] >= 2, "the pool should have grown"

        own_postgres.stop()  # every pooled connection is now dead, and nobody noticed
        own_postgres.start()
        # Each of these would fail on a dead pooled connection if the pool handed one out:
        # the pool checks a connection before lending it and replaces the dead ones.
        store.check()
        assert list(store.sell(2).serials) == [5, 6]
        start.reset()
        run_threads(buy, 4, indexed=False, timeout=30)  # as many at once as were pooled
        assert store.counts().sold == 10
    finally:
        store.close()


def test_database_outage_is_503_then_recovers_with_nothing_lost(
        own_postgres: PostgresServer, tmp_path: Path) -> None:
    total = 100_000
    database = own_postgres
    url = database.new_database()
    with service(url, tmp_path / "booth.log", "--tickets", str(total),
                 "--threads", "4") as booth:
        buyers = Buyers(booth.url, deadline=time.monotonic() + 90)
        threads = [threading.Thread(target=buyers.run) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            poll(lambda: buyers.count() >= 30, "sales before the outage", 15)

            database.stop()
            stopped = time.monotonic()
            poll(lambda: status_of(f"{booth.url}/healthz") == 503, "/healthz 503", 15)
            poll(lambda: len(buyers.unavailable) > 0, "a 503 from /buy", 15)
            healthz = requests.get(f"{booth.url}/healthz", timeout=10)
            assert healthz.status_code == 503
            assert healthz.json()["error"] == "store_unavailable"
            outage_purchases = buyers.count()

            database.start()
            restarted = time.monotonic()
            recovery = poll(lambda: buyers.count() > outage_purchases,
                            "a sale after the database came back", 20)
            poll(lambda: status_of(f"{booth.url}/healthz") == 200, "/healthz 200", 10)
            after = buyers.count()
            poll(lambda: buyers.count() >= after + 20, "sales going on", 15)
        finally:
            buyers.stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)

        print(f"outage: database down {restarted - stopped:.2f} s, first sale "
              f"{recovery:.2f} s after restart; purchases {buyers.count()}, "
              f"statuses {buyers.statuses}, 503 bodies e.g. {buyers.unavailable[0]}")
        assert not buyers.errors, buyers.errors[:5]
        assert not buyers.unfinished, "a purchase never got an answer"
        body, retry_after = buyers.unavailable[0]
        assert body["error"] == "store_unavailable" and retry_after == "1"

        acknowledged = buyers.acknowledged
        assert len(set(acknowledged)) == len(acknowledged), "a serial was sold twice"
        with requests.Session() as session:
            missing = [serial for serial in acknowledged
                       if session.get(f"{booth.url}/tickets/{serial}",
                                      timeout=10).status_code != 200]
        assert not missing, f"acknowledged but not sold: {missing[:10]}"
        counts = requests.get(f"{booth.url}/remaining", timeout=10).json()
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT coalesce(sum(count), 0) FROM sales").fetchone()
        assert row is not None
        # Every purchase was retried with its key until answered, so nothing was sold
        # that was not acknowledged either: the sale rows, counted by SQL, and the store's
        # own count both say exactly the acknowledged tickets.
        assert row[0] == counts["sold"] == len(acknowledged)
        assert counts["total"] == total


@pytest.mark.parametrize(("cut", "status", "error"), [
    ("terminate", 503, "store_unavailable"),  # the database aborts it and says so
    ("kill", 504, "outcome_unknown"),  # the connection just ends: it may have committed
], ids=["terminated", "killed"])
def test_a_batch_cut_off_mid_commit_answers_what_is_known(
        own_postgres: PostgresServer, tmp_path: Path, cut: str, status: int, error: str) -> None:
    url = own_postgres.new_database()
    # The chore keeps the batch inside ticketbooth_sell long enough to cut it off there.
    with service(url, tmp_path / "booth.log", "--tickets", "10", "--chore-ms", "2000") as booth:
        answers: list[requests.Response] = []
        buyer = threading.Thread(target=lambda: answers.append(requests.post(
            f"{booth.url}/buy", headers={"Idempotency-Key": "cut"}, timeout=60)))
        buyer.start()
        with psycopg.connect(url, autocommit=True) as conn:
            found: list[int] = []

            def selling() -> bool:
                # In the chore's pg_sleep: inside the function, not preparing the statement.
                row = conn.execute("SELECT pid FROM pg_stat_activity WHERE state = 'active' "
                                   "AND query LIKE '%ticketbooth_sell(%' "
                                   "AND wait_event = 'PgSleep' "
                                   "AND pid <> pg_backend_pid()").fetchone()
                found.extend([int(row[0])] if row else [])
                return bool(row)

            poll(selling, "the batch inside ticketbooth_sell", 15)
            pid = found[0]
            if cut == "terminate":
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        if cut == "kill":
            os.kill(pid, signal.SIGKILL)  # the server restarts every backend, ours too
        buyer.join(timeout=60)
        assert [(a.status_code, a.json()["error"]) for a in answers] == [(status, error)]

        # A retry with the key learns the truth once the database is back: the cut-off
        # batch did not commit, so the retry sells, and only once.
        def retried() -> bool:
            answer = requests.post(f"{booth.url}/buy", headers={"Idempotency-Key": "cut"},
                                   timeout=30)
            answers.append(answer)
            return answer.status_code == 200

        poll(retried, "a keyed retry answered 200", 30)
        assert answers[-1].json()["tickets"] == [{"serial": 1}]
        assert "Idempotent-Replayed" not in answers[-1].headers
        assert requests.get(f"{booth.url}/remaining", timeout=10).json()["sold"] == 1
