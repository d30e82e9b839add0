"""The durable SQLite store: restarts, refusals at start-up, database errors mid-request."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from app.settings import Settings
from app.stores import open_store
from app.stores.sqlite import SqliteStore
from tests.conftest import poll, run_cli, service_process, serving


def start_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return run_cli("serve", "--port", "0", *argv)


def test_restart_keeps_sales_lookups_and_keys(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'tickets.db'}"
    with service_process("--store", store, "--tickets", "50") as service:
        sale = requests.post(f"{service.url}/buy", json={"quantity": 3},
                             headers={"Idempotency-Key": "order-1"}, timeout=5)
        assert sale.status_code == 200
        sold_at = requests.get(f"{service.url}/tickets/2", timeout=5).json()["sold_at"]
        assert service.stop() == 0
    with service_process("--store", store, "--tickets", "50") as service:
        assert requests.get(f"{service.url}/remaining", timeout=5).json() == {
            "remaining": 47, "sold": 3, "held": 0, "total": 50}
        for serial in (1, 2, 3):
            assert requests.get(f"{service.url}/tickets/{serial}", timeout=5).status_code == 200
        assert requests.get(f"{service.url}/tickets/2", timeout=5).json()["sold_at"] == sold_at
        assert requests.get(f"{service.url}/tickets/4", timeout=5).status_code == 404
        replay = requests.post(f"{service.url}/buy", json={"quantity": 3},
                               headers={"Idempotency-Key": "order-1"}, timeout=5)
        assert replay.status_code == 200 and replay.json() == sale.json()
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert requests.get(f"{service.url}/remaining", timeout=5).json()["sold"] == 3
        assert service.stop() == 0


def test_restart_with_another_stock_is_refused(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'tickets.db'}"
    with service_process("--store", store, "--tickets", "50") as service:
        assert service.stop() == 0
    result = start_cli("--store", store, "--tickets", "60")
    assert result.returncode == 2
    assert "created with --tickets 50, not 60" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_relative_path_and_missing_folders_are_created(tmp_path: Path) -> None:
    with service_process("--store", "sqlite:///nested/deeper/tickets.db",
                         cwd=tmp_path) as service:
        assert service.stop() == 0
    assert (tmp_path / "nested" / "deeper" / "tickets.db").is_file()


def folder_in_the_way(tmp_path: Path) -> Path:
    (tmp_path / "tickets.db").mkdir()
    return tmp_path / "tickets.db"


def not_a_database(tmp_path: Path) -> Path:
    (tmp_path / "tickets.db").write_bytes(b"this is not a database" * 100)
    return tmp_path / "tickets.db"


def parent_is_a_file(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_text("x")
    return tmp_path / "plain" / "tickets.db"


@pytest.mark.parametrize("make_bad", [folder_in_the_way, not_a_database, parent_is_a_file])
def test_unusable_database_exits_2(tmp_path: Path, make_bad: Callable[[Path], Path]) -> None:
    result = start_cli("--store", f"sqlite:///{make_bad(tmp_path)}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ticketbooth: error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_database_error_is_503_and_nothing_is_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "tickets.db"
    with service_process("--store", f"sqlite:///{path}", "--tickets", "10") as service:
        assert requests.post(f"{service.url}/buy", timeout=5).status_code == 200
        # A real database fault, from the database itself: every insert of a sale aborts.
        with sqlite3.connect(path) as db:
            db.execute("CREATE TRIGGER fail BEFORE INSERT ON sales "
                       "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
        failed = requests.post(f"{service.url}/buy", json={"quantity": 2}, timeout=10)
        assert failed.status_code == 503
        assert failed.json()["error"] == "store_unavailable"
        assert failed.headers["Retry-After"] == "1"
        assert requests.get(f"{service.url}/remaining", timeout=5).json()["sold"] == 1
        with sqlite3.connect(path) as db:
            db.execute("DROP TRIGGER fail")
        recovered = requests.post(f"{service.url}/buy", timeout=5)
        assert recovered.json() == {"tickets": [{"serial": 2}], "remaining": 8}
        assert service.stop() == 0


def test_second_process_on_the_same_file_is_refused(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'tickets.db'}"
    with service_process("--store", store) as service:
        second = start_cli("--store", store)
        assert second.returncode == 2
        assert "in use by another ticketbooth process" in second.stderr
        assert requests.post(f"{service.url}/buy", timeout=5).status_code == 200
        assert service.stop() == 0
    # Once the owner has stopped, the file is free again.
    with service_process("--store", store) as service:
        assert requests.get(f"{service.url}/remaining", timeout=5).json()["sold"] == 1
        assert service.stop() == 0


def test_the_wal_is_reused_under_steady_sales(tmp_path: Path) -> None:
    """The writer's own checkpoints let the WAL start over instead of growing without end."""
    path = tmp_path / "tickets.db"
    store = SqliteStore(path, 100_000)
    try:
        wal = path.with_name(path.name + "-wal")
        sizes = []
        for _ in range(3):
            for _ in range(1_000):  # one commit each: a page or two of WAL per sale
                store.sell(1)
            sizes.append(wal.stat().st_size)
        assert store.counts().sold == 3_000
        # 3,000 commits append well over 3,000 pages; a reused WAL stays near 1,000.
        assert max(sizes) < 1_500 * 4_096, sizes
    finally:
        store.close()


def test_an_answer_past_the_order_timeout_says_whether_the_sale_may_happen(
        tmp_path: Path) -> None:
    """A sale the store holds when its time is up is 504 outcome_unknown (and may still
    happen); one still queued then is withdrawn: 503, nothing sold. Keyed retries learn
    which."""
    path = tmp_path / "tickets.db"
    settings = Settings(store=f"sqlite:///{path}", tickets=10, order_timeout=0.5)
    store = open_store(settings)
    try:
        with serving(settings, store) as url:
            answers: dict[str, requests.Response] = {}

            def buy(key: str) -> None:
                answers[key] = requests.post(f"{url}/buy", headers={"Idempotency-Key": key},
                                             timeout=30)

            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # the writer's commit waits for this lock
            try:
                first = threading.Thread(target=buy, args=("held",))
                first.start()
                orders = store._orders  # type: ignore[attr-defined]
                poll(lambda: orders.busy, "the writer to hold the first order")
                second = threading.Thread(target=buy, args=("queued",))
                second.start()
                first.join(timeout=30)
                second.join(timeout=30)
            finally:
                blocker.execute("ROLLBACK")  # the held sale now commits
                blocker.close()

            held, queued = answers["held"], answers["queued"]
            assert (held.status_code, held.json()["error"]) == (504, "outcome_unknown")
            assert (queued.status_code, queued.json()["error"]) == (503, "store_unavailable")
            retried = requests.post(f"{url}/buy", headers={"Idempotency-Key": "held"},
                                    timeout=30)
            assert retried.status_code == 200
            assert retried.headers.get("Idempotent-Replayed") == "true"  # it had happened
            assert retried.json()["tickets"] == [{"serial": 1}]
            fresh = requests.post(f"{url}/buy", headers={"Idempotency-Key": "queued"},
                                  timeout=30)
            assert fresh.status_code == 200 and "Idempotent-Replayed" not in fresh.headers
            assert fresh.json()["tickets"] == [{"serial": 2}]  # it had not
    finally:
        store.close()
