"""The durable embedded store: SQLite in WAL mode, every sale fsynced before it is answered.

Sales go through the group commit (:mod:`app.groupcommit`): this module is its backend, the
"commit this batch" for SQLite. The commit path is lean: a batch's serials are consecutive
and share one time, so a batch is one row of ``sales``, and a batch with no idempotency
keys is a single INSERT statement (its own transaction). Each statement releases and
retakes the GIL, so fewer statements means less waiting. One process owns the file (an
exclusive lock on ``PATH.lock``), which makes its in-memory counters authoritative; a
second process on the same file is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from app.groupcommit import Batch, GroupCommit, GroupCommitted, Order
from app.inventory import Counts, Receipt, Sale, SoldOut, StoreUnavailable
from app.stores import StoreSetupError

log = logging.getLogger("ticketbooth")

__all__ = ["SqliteStore", "path_from_url"]


SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    initial INTEGER NOT NULL,
    total   INTEGER NOT NULL
);
-- One row per committed batch: serials first_serial .. first_serial + count - 1.
CREATE TABLE IF NOT EXISTS sales (
    first_serial INTEGER PRIMARY KEY,
    count        INTEGER NOT NULL CHECK (count > 0),
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

# How long a connection waits for a lock held by another.
_BUSY_TIMEOUT_MS = 5000
# How often expired idempotency receipts are deleted.
_PURGE_EVERY_S = 60.0
# WAL pages after which a commit also checkpoints (SQLite's default, made explicit).
_CHECKPOINT_PAGES = 1000


def path_from_url(url: str) -> Path:
    """``sqlite:///data/t.db`` is relative, ``sqlite:////data/t.db`` absolute."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreSetupError(f"bad SQLite store URL {url!r}: use sqlite:///PATH")
    return Path(url[len(prefix):])


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                 check_same_thread=False)
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def _take_ownership(path: Path) -> int:
    """Hold an exclusive lock on ``PATH.lock`` for this process's life, or refuse."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreSetupError(f"{path} is in use by another ticketbooth process "
                              "(one process per SQLite file; use PostgreSQL to scale out)"
                              ) from None
    return fd


class SqliteStore(GroupCommitted):
    def __init__(self, path: Path, tickets: int, *, chore_s: float = 0.0,
                 key_ttl: float = 86400.0, order_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._chore_s = chore_s
        self._key_ttl = key_ttl
        self._clock = clock
        self._lock_fd, self._writer_db, self._counts = self._open(path, tickets)
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _readers
        self._next_purge = 0.0
        self._orders = GroupCommit(self._commit_batch, "sqlite-writer",
                                   timeout=order_timeout,
                                   housekeeping=self._purge)

    # --- start-up -------------------------------------------------------------------

    @staticmethod
    def _open(path: Path, tickets: int) -> tuple[int, sqlite3.Connection, Counts]:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = _take_ownership(path)
        except OSError as error:
            raise StoreSetupError(f"cannot use {path}: {error.strerror}") from error
        try:
            db = _connect(path)
            # The writer checkpoints itself, as part of a commit now and then. Nothing else
            # writes, so each checkpoint completes and the next commit starts the WAL over
            # at its beginning: the fsync of a commit then overwrites blocks the file
            # already has, about half the cost of one that grows the file (which a
            # checkpointer beside a busy writer never catches up with).
            db.execute(f"PRAGMA wal_autocheckpoint = {_CHECKPOINT_PAGES}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreSetupError(f"{path}: cannot switch to WAL mode (got {mode})")
            db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO stock (id, initial, total) VALUES (1, ?, ?)",
                       (tickets, tickets))
            initial, total = db.execute("SELECT initial, total FROM stock").fetchone()
            last = db.execute("SELECT first_serial + count - 1 FROM sales "
                              "ORDER BY first_serial DESC LIMIT 1").fetchone()
            db.execute("COMMIT")
            if initial != tickets:
                db.close()
                raise StoreSetupError(
                    f"{path} was created with --tickets {initial}, not {tickets}; "
                    "refusing to change the stock of an existing database")
        except (sqlite3.Error, StoreSetupError) as error:
            os.close(lock_fd)
            if isinstance(error, StoreSetupError):
                raise
            raise StoreSetupError(f"cannot use SQLite database {path}: {error}") from error
        return lock_fd, db, Counts(total, last[0] if last else 0)

    # --- the store interface --------------------------------------------------------


    def restock(self, tickets: int) -> Counts:
        result = self._orders.submit(Order(tickets, restock=True))
        assert isinstance(result, Counts)
        return result

    def counts(self) -> Counts:
        return self._counts  # committed state; replaced whole after each commit

    def sold_at(self, serial: int) -> datetime | None:
        if not 1 <= serial <= self._counts.sold:
            return None
        row = self._read("SELECT first_serial, count, sold_at FROM sales "
                         "WHERE first_serial <= ? ORDER BY first_serial DESC LIMIT 1",
                         (serial,))
        if row is None or serial >= row[0] + row[1]:
            return None
        return datetime.fromtimestamp(row[2], UTC)

    def check(self) -> None:
        if not self._orders.alive:
            raise StoreUnavailable("the SQLite writer has stopped")
        self._read("SELECT 1", ())

    def close(self) -> None:
        self._orders.close()  # it commits what is pending first
        with contextlib.suppress(sqlite3.Error):  # leave a small WAL behind
            self._writer_db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with self._lock:
            for connection in [self._writer_db, *self._readers]:
                connection.close()
        os.close(self._lock_fd)

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

    # --- writing: the group commit's backend -----------------------------------------

    def _commit_batch(self, batch: Batch) -> None:
        """Commit ``batch`` in one transaction, or roll back and raise StoreUnavailable."""
        try:
            self._commit(batch)
        except sqlite3.Error as failure:
            self._rollback()
            raise StoreUnavailable(f"the sale was not recorded: {failure}") from failure
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._writer_db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._writer_db.execute("ROLLBACK")

    def _commit(self, orders: Batch) -> None:
        """Sell a batch in one transaction; results and counts change only on success."""
        db = self._writer_db
        now = self._clock()
        total, sold = self._counts.total, self._counts.sold
        first = sold + 1
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
            quantity, remaining = order.quantity, total - sold
            if quantity > remaining:
                outcome: Sale | SoldOut = SoldOut(quantity, remaining)
            else:
                if self._chore_s:
                    time.sleep(self._chore_s)  # the lesson's chore, as the sole writer
                outcome = Sale(range(sold + 1, sold + 1 + quantity), remaining - quantity)
                sold += quantity
            if key is not None:
                receipts[key] = Receipt.of(quantity, outcome, now)
            results.append(outcome)

        sale_row = (first, sold - first + 1, now)
        if receipts or total != self._counts.total:
            db.execute("BEGIN IMMEDIATE")
            if sold >= first:
                db.execute("INSERT INTO sales VALUES (?, ?, ?)", sale_row)
            if receipts:
                db.executemany("INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?)",
                               [(k, r.quantity, r.serials.start, len(r.serials), r.remaining,
                                 r.created) for k, r in receipts.items()])
            if total != self._counts.total:
                db.execute("UPDATE stock SET total = ? WHERE id = 1", (total,))
            db.execute("COMMIT")
        elif sold >= first:
            # The common case: one statement, its own transaction, one fsync.
            db.execute("INSERT INTO sales VALUES (?, ?, ?)", sale_row)
        self._counts = Counts(total, sold)
        for order, result in zip(orders, results, strict=True):
            order.result = result

    def _purge(self) -> None:
        """Housekeeping before a batch: forget expired idempotency receipts."""
        now = self._clock()
        if now >= self._next_purge:
            self._next_purge = now + _PURGE_EVERY_S
            with contextlib.suppress(sqlite3.Error):
                self._writer_db.execute("DELETE FROM receipts WHERE created_at <= ?",
                                        (now - self._key_ttl,))

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
        return None if receipt.expired(now, self._key_ttl) else receipt
