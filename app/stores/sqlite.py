"""The durable embedded store: SQLite in WAL mode, every sale fsynced before it is answered.

Group commit: request threads hand their orders to one writer thread and wait. The writer
takes every order that arrived while it was busy, sells them in one transaction, commits
once (one fsync for the whole batch), and only then wakes their threads. The stock is read
inside that write transaction, so even a second process on the same file cannot sell a
ticket twice.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.inventory import Counts, Receipt, Sale, SoldOut, StoreUnavailable
from app.stores import StoreSetupError

__all__ = ["SqliteStore", "path_from_url"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    initial INTEGER NOT NULL,
    total   INTEGER NOT NULL,
    sold    INTEGER NOT NULL CHECK (sold BETWEEN 0 AND total)
);
CREATE TABLE IF NOT EXISTS sales (
    first_serial INTEGER PRIMARY KEY,
    count        INTEGER NOT NULL,
    sold_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts (
    key          TEXT PRIMARY KEY,
    quantity     INTEGER NOT NULL,
    first_serial INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    remaining    INTEGER NOT NULL,
    created_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_by_age ON receipts (created_at);
"""

# How long a writer waits for another connection's write lock, and a request for its batch.
_BUSY_TIMEOUT_MS = 5000
_ORDER_TIMEOUT_S = 30.0
# How often expired idempotency receipts are deleted.
_PURGE_EVERY_S = 60.0


def path_from_url(url: str) -> Path:
    """``sqlite:///data/t.db`` is relative, ``sqlite:////data/t.db`` absolute."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreSetupError(f"bad SQLite store URL {url!r}: use sqlite:///PATH")
    return Path(url[len(prefix):])


@dataclass(slots=True)
class _Order:
    quantity: int  # tickets to sell; for a restock, tickets to add
    key: str | None = None
    restock: bool = False
    result: Sale | Counts | Exception | None = None


@dataclass(slots=True)
class _Batch:
    orders: list[_Order] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                 check_same_thread=False)
    connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA synchronous = FULL")
    return connection


class SqliteStore:
    def __init__(self, path: Path, tickets: int, *, chore_s: float = 0.0,
                 key_ttl: float = 86400.0, clock: Callable[[], float] = time.time) -> None:
        self._chore_s = chore_s
        self._key_ttl = key_ttl
        self._clock = clock
        self._writer_db = self._open(path, tickets)
        self.path = path
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending = _Batch()
        self._closing = False
        self._next_purge = 0.0
        self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer",
                                        daemon=True)
        self._writer.start()

    # --- start-up -------------------------------------------------------------------

    @staticmethod
    def _open(path: Path, tickets: int) -> sqlite3.Connection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = _connect(path)
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreSetupError(f"{path}: cannot switch to WAL mode (got {mode})")
            db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO stock (id, initial, total, sold) "
                       "VALUES (1, ?, ?, 0)", (tickets, tickets))
            initial = db.execute("SELECT initial FROM stock WHERE id = 1").fetchone()[0]
            db.execute("COMMIT")
        except sqlite3.Error as error:
            raise StoreSetupError(f"cannot use SQLite database {path}: {error}") from error
        except OSError as error:
            raise StoreSetupError(f"cannot create {path.parent}: {error.strerror}") from error
        if initial != tickets:
            db.close()
            raise StoreSetupError(f"{path} was created with --tickets {initial}, not {tickets}; "
                             "refusing to change the stock of an existing database")
        return db

    # --- the store interface --------------------------------------------------------

    def sell(self, quantity: int, key: str | None = None) -> Sale:
        result = self._submit(_Order(quantity, key))
        assert isinstance(result, Sale)
        return result

    def restock(self, tickets: int) -> Counts:
        result = self._submit(_Order(tickets, restock=True))
        assert isinstance(result, Counts)
        return result

    def counts(self) -> Counts:
        total, sold = self._read("SELECT total, sold FROM stock WHERE id = 1", ())
        return Counts(total, sold)

    def sold_at(self, serial: int) -> datetime | None:
        if serial < 1 or serial > 2**63 - 1:
            return None
        row = self._read("SELECT first_serial, count, sold_at FROM sales "
                         "WHERE first_serial <= ? ORDER BY first_serial DESC LIMIT 1",
                         (serial,))
        if row is None or serial >= row[0] + row[1]:
            return None
        return datetime.fromtimestamp(row[2], UTC)

    def check(self) -> None:
        self._read("SELECT 1", ())
        if not self._writer.is_alive():
            raise StoreUnavailable("the SQLite writer has stopped")

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._writer.join(timeout=_ORDER_TIMEOUT_S)
        for connection in [self._writer_db, *self._readers]:
            connection.close()

    # --- reading: one connection per thread (WAL readers never block the writer) ----

    def _read(self, sql: str, args: tuple[object, ...]) -> tuple[int, ...]:
        db = getattr(self._local, "db", None)
        try:
            if db is None:
                db = self._local.db = _connect(self.path)
                with self._lock:
                    self._readers.append(db)
            return db.execute(sql, args).fetchone()  # type: ignore[no-any-return]
        except sqlite3.Error as error:
            raise StoreUnavailable(f"the database cannot be read: {error}") from error

    # --- writing: group commit --------------------------------------------------------

    def _submit(self, order: _Order) -> Sale | Counts:
        with self._lock:
            if self._closing:
                raise StoreUnavailable("the store is closing")
            batch = self._pending
            batch.orders.append(order)
            if len(batch.orders) == 1:
                self._wake.notify()
        if not batch.done.wait(_ORDER_TIMEOUT_S):
            raise StoreUnavailable("the database did not commit in time")
        if isinstance(order.result, Exception):
            raise order.result
        assert order.result is not None
        return order.result

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending.orders and not self._closing:
                    self._wake.wait()
                batch, self._pending = self._pending, _Batch()
                if not batch.orders and self._closing:
                    return
            try:
                self._commit(batch.orders)
            except sqlite3.Error as error:
                self._rollback()
                failure = StoreUnavailable(f"the sale was not recorded: {error}")
                for order in batch.orders:
                    order.result = failure
            except Exception as error:  # a bug: answer every waiting request with it
                self._rollback()
                for order in batch.orders:
                    order.result = error
            finally:
                batch.done.set()

    def _rollback(self) -> None:
        if self._writer_db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._writer_db.execute("ROLLBACK")

    def _commit(self, orders: list[_Order]) -> None:
        """Sell a batch of orders in one transaction. Results are set only on success."""
        db = self._writer_db
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        total, sold = db.execute("SELECT total, sold FROM stock WHERE id = 1").fetchone()
        sales: list[tuple[int, int, float]] = []
        receipts: dict[str, Receipt] = {}
        results: list[Sale | Counts | Exception] = []
        for order in orders:
            if order.restock:
                total += order.quantity
                results.append(Counts(total, sold))
                continue
            key = order.key
            if key is not None:
                receipt = self._receipt(key, receipts, now)
                if receipt is not None:
                    try:
                        results.append(receipt.replay(key, order.quantity))
                    except Exception as replayed:
                        results.append(replayed)
                    continue
            quantity = order.quantity
            remaining = total - sold
            if quantity > remaining:
                outcome: Sale | SoldOut = SoldOut(quantity, remaining)
            else:
                if self._chore_s:
                    time.sleep(self._chore_s)
                sales.append((sold + 1, quantity, now))
                outcome = Sale(range(sold + 1, sold + 1 + quantity), remaining - quantity)
                sold += quantity
            if key is not None:
                receipts[key] = Receipt.of(quantity, outcome, now)
            results.append(outcome)
        if sales:
            db.executemany("INSERT INTO sales (first_serial, count, sold_at) VALUES (?, ?, ?)",
                           sales)
        if receipts:
            db.executemany("INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?)",
                           [(key, r.quantity, r.serials.start, len(r.serials), r.remaining,
                             r.created) for key, r in receipts.items()])
        db.execute("UPDATE stock SET total = ?, sold = ? WHERE id = 1", (total, sold))
        if now >= self._next_purge:
            db.execute("DELETE FROM receipts WHERE created_at <= ?", (now - self._key_ttl,))
            self._next_purge = now + _PURGE_EVERY_S
        db.execute("COMMIT")
        for order, result in zip(orders, results, strict=True):
            order.result = result

    def _receipt(self, key: str, batch: dict[str, Receipt], now: float) -> Receipt | None:
        """The live receipt for ``key``: from this batch, else from the database."""
        receipt = batch.get(key)
        if receipt is None:
            row = self._writer_db.execute(
                "SELECT quantity, first_serial, count, remaining, created_at FROM receipts "
                "WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            quantity, first, count, remaining, created = row
            receipt = Receipt(quantity, range(first, first + count), remaining, created)
        return None if receipt.created <= now - self._key_ttl else receipt
