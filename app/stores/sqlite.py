"""The durable embedded store: SQLite in WAL mode, every sale fsynced before it is answered.

Group commit: orders go into the pending batch. One writer thread takes the whole pending
batch (every order that arrived while it was busy), sells it in one transaction with one
fsync, and then tells each order its outcome: it wakes the thread waiting in :meth:`sell`,
or calls the callback given to :meth:`sell_later` (a parked request, see app.parking, whose
worker thread did not wait). So while one commit waits on the disk the next batch gathers,
and no order queues behind a commit that does not hold it. Each answer is given only after
the commit that holds its sale.

The commit path is lean: a batch's serials are consecutive and share one time, so a batch
is one row of ``sales``, and a batch with no idempotency keys is a single INSERT statement
(its own transaction). Each statement releases and retakes the GIL, so fewer statements
means less waiting. One process owns the file (an exclusive lock on ``PATH.lock``), which
makes its in-memory counters authoritative; a second process on the same file is refused.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.inventory import Counts, Outcome, Receipt, Sale, SoldOut, StoreUnavailable
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

# How long a connection waits for a lock held by another, and a request for its commit.
_BUSY_TIMEOUT_MS = 5000
_ORDER_TIMEOUT_S = 30.0
# How often expired idempotency receipts are deleted.
_PURGE_EVERY_S = 60.0
# A commit delay, like PostgreSQL's commit_delay and commit_siblings: when the last batch
# held _BUSY_BATCH orders or more (the store is busy) and fewer are pending, the writer waits
# up to _GATHER_S for more before it commits, and starts at once when the _BUSY_BATCH-th
# arrives. Under load that trades a fraction of a millisecond for fewer fsyncs per sale; a
# store that is not busy never waits.
_BUSY_BATCH = 16
_GATHER_S = 0.0005
# WAL pages after which a commit also checkpoints (SQLite's default, made explicit).
_CHECKPOINT_PAGES = 1000


def path_from_url(url: str) -> Path:
    """``sqlite:///data/t.db`` is relative, ``sqlite:////data/t.db`` absolute."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise StoreSetupError(f"bad SQLite store URL {url!r}: use sqlite:///PATH")
    return Path(url[len(prefix):])


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(slots=True)
class _Order:
    quantity: int  # tickets to sell; for a restock, tickets to add
    key: str | None = None
    restock: bool = False
    result: Sale | Counts | Exception | None = None
    # Told the result once it is set: a deferred sale's callback, or None, and then the
    # order's thread waits on ``done``, held until then: the cheapest wake-up there is (one
    # futex), and no lock shared with the rest of the batch.
    callback: Callable[[Outcome], None] | None = None
    done: threading.Lock | None = None


def _tell(callback: Callable[[Outcome], None], result: object) -> None:
    """Give a deferred sale its outcome; a caller's bug must not stop the writer."""
    assert isinstance(result, Sale | Exception)
    try:
        callback(result)
    except Exception:
        log.exception("a deferred sale's callback failed")


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


class SqliteStore:
    def __init__(self, path: Path, tickets: int, *, chore_s: float = 0.0,
                 key_ttl: float = 86400.0, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._chore_s = chore_s
        self._key_ttl = key_ttl
        self._clock = clock
        self._lock_fd, self._writer_db, self._counts = self._open(path, tickets)
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _pending, _closed and _readers; held briefly
        self._wake = threading.Condition(self._lock)  # the writer waits here for orders
        self._pending: list[_Order] = []
        self._closed = False
        self._next_purge = 0.0
        self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer",
                                        daemon=True)
        self._writer.start()

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

    def sell(self, quantity: int, key: str | None = None) -> Sale:
        result = self._submit(_Order(quantity, key))
        assert isinstance(result, Sale)
        return result

    def sell_later(self, quantity: int, done: Callable[[Outcome], None]) -> None:
        self._enqueue(_Order(quantity, callback=done))

    def restock(self, tickets: int) -> Counts:
        result = self._submit(_Order(tickets, restock=True))
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
        if not self._writer.is_alive():
            raise StoreUnavailable("the SQLite writer has stopped")
        self._read("SELECT 1", ())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._writer.join(timeout=_ORDER_TIMEOUT_S)  # it commits what is pending first
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

    # --- writing: group commit --------------------------------------------------------

    def _enqueue(self, order: _Order) -> None:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            self._pending.append(order)
            if len(self._pending) in (1, _BUSY_BATCH):
                self._wake.notify()

    def _submit(self, order: _Order) -> Sale | Counts:
        order.done = _held_lock()
        self._enqueue(order)
        if not order.done.acquire(timeout=_ORDER_TIMEOUT_S):
            raise StoreUnavailable("the database did not commit in time")
        if isinstance(order.result, Exception):
            raise order.result
        assert order.result is not None
        return order.result

    def _write_loop(self) -> None:
        """The writer: commit each pending batch as soon as the previous one is done."""
        last = 0  # orders in the last batch
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if last >= _BUSY_BATCH and len(self._pending) < _BUSY_BATCH and not self._closed:
                    self._wake.wait(_GATHER_S)  # woken early by the _BUSY_BATCH-th order
                batch, self._pending = self._pending, []
            last = len(batch)
            if not batch:  # closed, and nothing left to commit
                return
            self._commit_batch(batch)
            for order in batch:
                if order.callback is None:
                    assert order.done is not None
                    order.done.release()
                else:
                    _tell(order.callback, order.result)

    def _commit_batch(self, batch: list[_Order]) -> None:
        """Commit ``batch``; every order gets a result, a failure included."""
        try:
            self._commit(batch)
            return
        except sqlite3.Error as failure:
            self._rollback()
            error: Exception = StoreUnavailable(f"the sale was not recorded: {failure}")
        except Exception as bug:  # answer every waiting request with it, then go on
            self._rollback()
            error = bug
        for order in batch:
            order.result = error

    def _rollback(self) -> None:
        if self._writer_db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._writer_db.execute("ROLLBACK")

    def _commit(self, orders: list[_Order]) -> None:
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
        if now >= self._next_purge:  # housekeeping: the batch is committed whatever happens
            self._next_purge = now + _PURGE_EVERY_S
            with contextlib.suppress(sqlite3.Error):
                db.execute("DELETE FROM receipts WHERE created_at <= ?", (now - self._key_ttl,))

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
