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
from typing import Any

from app.groupcommit import Batch, GroupCommit, GroupCommitted, Order
from app.inventory import (
    Counts,
    Hold,
    LiveHolds,
    Receipt,
    Sale,
    SoldOut,
    StoreUnavailable,
    TicketboothError,
    judge,
)
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
    created_at   REAL NOT NULL,
    kind         TEXT NOT NULL DEFAULT 'buy',
    hold_id      TEXT,
    expires_at   REAL
);
CREATE INDEX IF NOT EXISTS receipts_by_age ON receipts (created_at);
-- A hold counts against the stock while its state is 'held' and it has not expired;
-- a confirmed hold's serials are first_serial .. first_serial + quantity - 1.
CREATE TABLE IF NOT EXISTS holds (
    id           TEXT PRIMARY KEY,
    quantity     INTEGER NOT NULL CHECK (quantity > 0),
    expires_at   REAL NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('held', 'confirmed', 'released', 'expired')),
    first_serial INTEGER
);
CREATE INDEX IF NOT EXISTS holds_live ON holds (expires_at) WHERE state = 'held';
"""
# Columns added to receipts after its first release: added to older databases at start-up.
_NEW_RECEIPT_COLUMNS = {"kind": "TEXT NOT NULL DEFAULT 'buy'", "hold_id": "TEXT",
                        "expires_at": "REAL"}

# How long a connection waits for a lock held by another.
_BUSY_TIMEOUT_MS = 5000
# How often expired idempotency receipts are deleted.
_PURGE_EVERY_S = 60.0
#: Keys looked up in one query: well under SQLite's limit on a statement's parameters.
_KEYS_PER_QUERY = 500
# WAL pages after which a commit also checkpoints (SQLite's default, made explicit).
_CHECKPOINT_PAGES = 1000
# Expired holds are marked expired at most this many per statement.
EXPIRE_BATCH = 100


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
        self._lock_fd, self._writer_db, self._counts, self._live = self._open(path, tickets)
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _readers
        # Guards _counts with _live: the writer changes them after each commit, readers
        # count the tickets held at their own instant.
        self._live_lock = threading.Lock()
        self._expired = 0
        self._next_purge = 0.0
        self._orders = GroupCommit([self._commit_batch], "sqlite-writer",
                                   timeout=order_timeout,
                                   housekeeping=self._housekeeping)

    # --- start-up -------------------------------------------------------------------

    @staticmethod
    def _open(path: Path, tickets: int) -> tuple[int, sqlite3.Connection, Counts, LiveHolds]:
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
            have = {row[1] for row in db.execute("PRAGMA table_info(receipts)")}
            for column, declaration in _NEW_RECEIPT_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE receipts ADD COLUMN {column} {declaration}")
            live = LiveHolds()
            for hold_id, quantity, expires_at in db.execute(
                    "SELECT id, quantity, expires_at FROM holds WHERE state = 'held'"):
                live.add(hold_id, quantity, expires_at)
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
        return lock_fd, db, Counts(total, last[0] if last else 0), live

    # --- the store interface --------------------------------------------------------


    def restock(self, tickets: int) -> Counts:
        result = self._orders.submit(Order(tickets, kind="restock"))
        assert isinstance(result, Counts)
        return result

    def counts(self) -> Counts:
        with self._live_lock:  # committed state, and the holds live at this instant
            counts = self._counts
            if not self._live:
                return counts
            return Counts(counts.total, counts.sold, self._live.held(self._clock()))

    def get_hold(self, hold_id: str) -> Hold | None:
        row = self._read("SELECT quantity, expires_at, state, first_serial FROM holds "
                         "WHERE id = ?", (hold_id,))
        return None if row is None else _hold(hold_id, row).seen_at(self._clock())

    def holds_expired(self) -> int:
        return self._expired

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

    def _read(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...]:
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
        with self._live_lock:
            held = self._live.held(now) if self._live else 0
        first = sold + 1
        stored = self._stored_receipts({order.key for order in orders
                                        if order.key is not None}, now)
        receipts: dict[str, Receipt] = {}
        holds: dict[str, Hold] = {}  # created or changed in this batch
        results: list[Sale | Counts | Hold | Exception] = []
        for order in orders:
            kind, quantity, key = order.kind, order.quantity, order.key
            if kind == "restock":
                total += quantity
                results.append(Counts(total, sold, held))
                continue
            if kind == "confirm" or kind == "release":
                hold_id = order.hold_id
                assert hold_id is not None
                hold = holds.get(hold_id) or self._stored_hold(hold_id)
                try:
                    settled = judge(hold, kind, now)
                except TicketboothError as refused:
                    results.append(refused)
                    continue
                if settled is not None:  # answered as it stands
                    results.append(Sale(settled.serials, total - sold - held, replayed=True)
                                   if kind == "confirm" else settled)
                    continue
                assert hold is not None
                held -= hold.quantity
                if kind == "confirm":
                    serials = range(sold + 1, sold + 1 + hold.quantity)
                    sold += hold.quantity
                    holds[hold_id] = Hold(hold_id, hold.quantity, "confirmed",
                                          hold.expires_at, serials)
                    results.append(Sale(serials, total - sold - held))
                else:
                    holds[hold_id] = Hold(hold_id, hold.quantity, "released", hold.expires_at)
                    results.append(holds[hold_id])
                continue
            if key is not None:
                receipt = receipts.get(key) or stored.get(key)
                if receipt is not None:
                    try:
                        results.append(receipt.replay(key, quantity) if kind == "sell"
                                       else receipt.replay_hold(key, quantity))
                    except Exception as replayed:
                        results.append(replayed)
                    continue
            remaining = total - sold - held
            outcome: Sale | Hold | SoldOut
            if quantity > remaining:
                outcome = SoldOut(quantity, remaining)
            elif kind == "hold":
                assert order.hold_id is not None
                outcome = holds[order.hold_id] = Hold(order.hold_id, quantity, "held",
                                                      now + order.ttl)
                held += quantity
            else:
                if self._chore_s:
                    time.sleep(self._chore_s)  # the lesson's chore, as the sole writer
                outcome = Sale(range(sold + 1, sold + 1 + quantity), remaining - quantity)
                sold += quantity
            if key is not None:
                receipts[key] = Receipt.of(quantity, outcome, now,
                                           "hold" if kind == "hold" else "buy")
            results.append(outcome)

        sale_row = (first, sold - first + 1, now)
        if receipts or holds or total != self._counts.total:
            db.execute("BEGIN IMMEDIATE")
            if sold >= first:
                db.execute("INSERT INTO sales VALUES (?, ?, ?)", sale_row)
            if holds:
                db.executemany(
                    "INSERT OR REPLACE INTO holds (id, quantity, expires_at, state, "
                    "first_serial) VALUES (?, ?, ?, ?, ?)",
                    [(h.id, h.quantity, h.expires_at, h.state,
                      h.serials.start if h.serials else None) for h in holds.values()])
            if receipts:
                db.executemany(
                    "INSERT OR REPLACE INTO receipts (key, quantity, first_serial, count, "
                    "remaining, created_at, kind, hold_id, expires_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(k, r.quantity, r.serials.start, len(r.serials), r.remaining,
                      r.created, r.kind, r.hold_id, r.expires_at)
                     for k, r in receipts.items()])
            if total != self._counts.total:
                db.execute("UPDATE stock SET total = ? WHERE id = 1", (total,))
            db.execute("COMMIT")
        elif sold >= first:
            # The common case: one statement, its own transaction, one fsync.
            db.execute("INSERT INTO sales VALUES (?, ?, ?)", sale_row)
        with self._live_lock:
            self._counts = Counts(total, sold)
            for hold in holds.values():
                if hold.state == "held":
                    self._live.add(hold.id, hold.quantity, hold.expires_at)
                else:
                    self._live.remove(hold.id)
        for order, result in zip(orders, results, strict=True):
            order.result = result

    def _stored_hold(self, hold_id: str) -> Hold | None:
        row = self._writer_db.execute(
            "SELECT quantity, expires_at, state, first_serial FROM holds WHERE id = ?",
            (hold_id,)).fetchone()
        return None if row is None else _hold(hold_id, row)

    def _housekeeping(self, lane: int) -> None:  # one writer: lane 0
        self._expire_holds()
        self._purge()

    def _expire_holds(self) -> None:
        """Mark a small batch of expired holds expired (they stopped counting already)."""
        with self._live_lock:
            due = self._live.due(self._clock(), EXPIRE_BATCH) if self._live else []
        if not due:
            return
        marks = ", ".join("?" * len(due))
        try:
            self._writer_db.execute(
                f"UPDATE holds SET state = 'expired' WHERE state = 'held' AND id IN ({marks})",
                due)
        except sqlite3.Error as error:
            log.warning("expiring holds failed: %s", error)
            return
        with self._live_lock:
            for hold_id in due:
                self._live.remove(hold_id)
        self._expired += len(due)

    def _purge(self) -> None:
        """Housekeeping before a batch: forget expired idempotency receipts."""
        now = self._clock()
        if now >= self._next_purge:
            self._next_purge = now + _PURGE_EVERY_S
            with contextlib.suppress(sqlite3.Error):
                self._writer_db.execute("DELETE FROM receipts WHERE created_at <= ?",
                                        (now - self._key_ttl,))

    def _stored_receipts(self, keys: set[str], now: float) -> dict[str, Receipt]:
        """The live receipts on record for ``keys``, by key: one query for a batch's keys
        (a few hundred at a time), not one for each keyed order."""
        found: dict[str, Receipt] = {}
        wanted = list(keys)
        for start in range(0, len(wanted), _KEYS_PER_QUERY):
            chunk = wanted[start:start + _KEYS_PER_QUERY]
            # By key alone (the primary key); a condition on created_at could have the
            # planner scan receipts_by_age, every receipt of the last TTL, instead.
            for key, quantity, first, count, remaining, created, kind, hold_id, expires_at \
                    in self._writer_db.execute(
                        "SELECT key, quantity, first_serial, count, remaining, created_at, "
                        "kind, hold_id, expires_at FROM receipts WHERE key IN "
                        f"({', '.join('?' * len(chunk))})", chunk):
                receipt = Receipt(quantity, range(first, first + count), remaining, created,
                                  kind, hold_id, expires_at or 0.0)
                if not receipt.expired(now, self._key_ttl):
                    found[key] = receipt
        return found


def _hold(hold_id: str, row: tuple[Any, ...]) -> Hold:
    quantity, expires_at, state, first = row
    serials = range(first, first + quantity) if first is not None else range(0)
    return Hold(hold_id, quantity, state, expires_at, serials)
