"""The PostgreSQL store: one database shared by any number of service processes.

Every sale is one transaction. The stock is a single row, and the sale is a conditional
``UPDATE stock SET sold = sold + k WHERE sold + k <= total RETURNING ...``: PostgreSQL's row
lock on that one row is the lesson's lock, held from the UPDATE to the COMMIT, and it works
across processes and machines. The sale's row and its idempotency receipt are written in
the same transaction, so they exist exactly when the sale does.

Idempotency keys across instances: a keyed sale first claims its key by inserting the
receipt row. A second transaction with the same key, in this process or another, blocks on
that row's primary key until the first commits, then finds the first's receipt and replays
it (or, if the first rolled back, claims the key itself). Receipts older than the TTL count
as absent and are purged in small batches.

Connections come from a psycopg_pool pool with short timeouts, so that while the database
is away ``/buy`` answers 503 within seconds, and the pool reconnects by itself when it is
back. A transaction whose connection is lost before COMMIT is retried once per pooled
connection (nothing of it was committed); one lost *during* COMMIT is reported as
unavailable, since the sale may or may not have been recorded: a retry with the same
Idempotency-Key tells.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import Connection
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from app.inventory import Counts, Receipt, Sale, SoldOut, StoreUnavailable
from app.stores import StoreSetupError

__all__ = ["PostgresStore"]

log = logging.getLogger("ticketbooth")

T = TypeVar("T")

#: Longest a request waits for a pooled connection before answering 503.
POOL_TIMEOUT_S = 2.0
#: How long the pool keeps retrying one lost connection (with backoff) before it gives the
#: slot up; new demand then starts a fresh attempt at once. Short, so that after a long
#: outage the pool is not asleep in a long backoff when the database comes back.
RECONNECT_TIMEOUT_S = 5.0
#: Connect timeout for start-up and for each new pooled connection (libpq's minimum is 2).
CONNECT_TIMEOUT_S = 3
#: Expired receipts are purged at most this often per process, this many at a time.
PURGE_EVERY_S = 60.0
PURGE_BATCH = 1000
#: Serials are bigint.
MAX_SERIAL = 2**63 - 1
#: Any constant will do: serialises schema creation among instances starting at once.
SCHEMA_LOCK = 0x7469636B  # "tick"

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS stock (
        id boolean PRIMARY KEY DEFAULT true CHECK (id),
        initial bigint NOT NULL CHECK (initial >= 0),
        total bigint NOT NULL,
        sold bigint NOT NULL DEFAULT 0,
        CHECK (0 <= sold AND sold <= total)
    )""",
    """CREATE TABLE IF NOT EXISTS sales (
        first_serial bigint PRIMARY KEY CHECK (first_serial >= 1),
        count integer NOT NULL CHECK (count >= 1),
        sold_at timestamptz NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS receipts (
        key text PRIMARY KEY,
        quantity integer NOT NULL,
        first_serial bigint,
        count integer NOT NULL,
        remaining bigint NOT NULL,
        created timestamptz NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS receipts_created ON receipts (created)",
)

# Claim a key: a new receipt row, or take over an expired one. Returns a row only when
# this transaction now owns the key. A concurrent claimer of the same key blocks here.
CLAIM = """
    INSERT INTO receipts AS r (key, quantity, first_serial, count, remaining, created)
    VALUES (%(key)s, %(quantity)s, NULL, 0, 0, %(now)s)
    ON CONFLICT (key) DO UPDATE
        SET quantity = EXCLUDED.quantity, first_serial = NULL, count = 0, remaining = 0,
            created = EXCLUDED.created
        WHERE r.created <= %(cutoff)s
    RETURNING 1
"""

PURGE = """
    DELETE FROM receipts WHERE key IN (
        SELECT key FROM receipts WHERE created <= %s
        ORDER BY created LIMIT %s FOR UPDATE SKIP LOCKED)
"""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _where(conninfo: str) -> str:
    """host:port/dbname of a connection string, without user or password."""
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "PostgreSQL"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    return f"{host}:{port}/{parts.get('dbname') or ''}"


def _connection_options(url: str) -> dict[str, Any]:
    """Defaults for every connection; anything given in the URL wins."""
    given = conninfo_to_dict(url)
    defaults: dict[str, Any] = {
        "application_name": "ticketbooth",
        "connect_timeout": CONNECT_TIMEOUT_S,
        # Notice a peer that vanished without closing the connection (TCP only).
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,
    }
    return {name: value for name, value in defaults.items() if name not in given}


class PostgresStore:
    """Tickets in a PostgreSQL database that several service processes may share."""

    def __init__(self, url: str, tickets: int, *, pool_size: int = 10, chore_s: float = 0.0,
                 key_ttl: float = 86400.0, clock: Callable[[], float] = time.time) -> None:
        self._chore_s = chore_s
        self._key_ttl = key_ttl
        self._clock = clock
        self._pool_size = pool_size
        self._where = _where(url)
        self._purge_every = min(PURGE_EVERY_S, key_ttl)
        self._next_purge = float("-inf")
        self._purge_lock = threading.Lock()
        # The pool logs every checkout at INFO; keep its warnings (lost connections).
        logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
        try:
            options = _connection_options(url)
        except psycopg.ProgrammingError as error:
            raise StoreSetupError(f"invalid PostgreSQL URL: {_one_line(error)}") from error
        self._set_up(url, tickets, options)
        self._pool: ConnectionPool[Connection[Any]] = ConnectionPool(
            url, kwargs=options, min_size=1, max_size=pool_size, open=False,
            name="ticketbooth", timeout=POOL_TIMEOUT_S,
            reconnect_timeout=RECONNECT_TIMEOUT_S)
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S + POOL_TIMEOUT_S)
        except PoolTimeout as error:
            self._pool.close()
            raise StoreSetupError(f"cannot open a connection pool to {self._where}: "
                                  f"{_one_line(error)}") from error

    # -- start-up ------------------------------------------------------------------------

    def _set_up(self, url: str, tickets: int, options: dict[str, Any]) -> None:
        """Create the schema if needed and check the stock matches ``tickets``."""
        try:
            with psycopg.connect(url, **options) as conn:
                # One instance at a time: CREATE TABLE IF NOT EXISTS alone races.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO stock (initial, total, sold) VALUES (%s, %s, 0) "
                             "ON CONFLICT (id) DO NOTHING", (tickets, tickets))
                row = conn.execute("SELECT initial FROM stock").fetchone()
        except psycopg.OperationalError as error:
            raise StoreSetupError(f"cannot reach PostgreSQL at {self._where}: "
                                  f"{_one_line(error)}") from error
        except psycopg.Error as error:
            raise StoreSetupError(f"cannot set up the database at {self._where}: "
                                  f"{_one_line(error)}") from error
        assert row is not None
        initial = int(row[0])
        if initial != tickets:
            # Worded as the SQLite store words it. Restocks change ``total``, not ``initial``.
            raise StoreSetupError(
                f"the database at {self._where} was created with --tickets {initial}, not "
                f"{tickets}; refusing to change the stock of an existing database")

    # -- running transactions ------------------------------------------------------------

    def _transaction(self, work: Callable[[Connection[Any]], T]) -> T:
        """Run ``work`` in one transaction on a pooled connection and commit it.

        A connection found lost before COMMIT (a stale one after a database restart, or
        one cut mid-transaction) committed nothing, so the work is retried on another,
        a bounded number of times within the pool timeout. Every other
        ``OperationalError`` becomes :class:`StoreUnavailable`.
        """
        deadline = time.monotonic() + POOL_TIMEOUT_S
        lost: psycopg.OperationalError | None = None
        for attempt in range(self._pool_size + 1):
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                conn = self._pool.getconn(timeout=wait)
            except (PoolTimeout, PoolClosed) as error:
                log.warning("PostgreSQL at %s unavailable: %s", self._where, _one_line(error))
                raise StoreUnavailable("the ticket database cannot be reached; nothing was "
                                       "sold") from error
            committing = False
            try:
                result = work(conn)
                committing = True
                conn.commit()
                return result
            except psycopg.OperationalError as error:
                log.warning("PostgreSQL at %s failed (attempt %d): %s", self._where,
                            attempt + 1, _one_line(error))
                if committing:
                    raise StoreUnavailable(
                        "the connection to the ticket database was lost while committing; "
                        "the sale may have been recorded: retry with the same "
                        "Idempotency-Key to learn its outcome") from error
                if not conn.broken:
                    raise StoreUnavailable("the ticket database failed to answer; nothing "
                                           "was sold") from error
                lost = error  # nothing committed: try again on another connection
            finally:
                if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):  # the pool drops a broken one
                        conn.rollback()
                self._pool.putconn(conn)
        raise StoreUnavailable("the ticket database cannot be reached; nothing was "
                               "sold") from lost

    # -- the Store interface -------------------------------------------------------------

    def sell(self, quantity: int, key: str | None = None) -> Sale:
        if key is not None:
            self._maybe_purge()
        outcome = self._transaction(lambda conn: self._sell(conn, quantity, key))
        if isinstance(outcome, SoldOut):
            raise outcome
        return outcome

    def _sell(self, conn: Connection[Any], quantity: int, key: str | None) -> Sale | SoldOut:
        now = self._clock()
        moment = datetime.fromtimestamp(now, UTC)
        if key is not None:
            claimed = conn.execute(CLAIM, {
                "key": key, "quantity": quantity, "now": moment,
                "cutoff": datetime.fromtimestamp(now - self._key_ttl, UTC)}).fetchone()
            if claimed is None:  # a live receipt, committed by an earlier request
                return self._replay(conn, key, quantity)
        outcome = self._take(conn, quantity, moment)
        if key is not None:
            serials = outcome.serials if isinstance(outcome, Sale) else range(0)
            conn.execute(
                "UPDATE receipts SET first_serial = %s, count = %s, remaining = %s, "
                "created = %s WHERE key = %s",
                (serials.start if serials else None, len(serials), outcome.remaining,
                 moment, key))
        return outcome

    def _take(self, conn: Connection[Any], quantity: int, moment: datetime) -> Sale | SoldOut:
        """The conditional decrement; the stock row stays locked until COMMIT."""
        row = conn.execute(
            "UPDATE stock SET sold = sold + %(k)s WHERE sold + %(k)s <= total "
            "RETURNING sold, total", {"k": quantity}).fetchone()
        if row is None:
            # Not enough left, as of the latest commit. Lock the row to read a remaining
            # that stays true until we finish: a restock may have just raced in.
            locked = conn.execute("SELECT sold, total FROM stock FOR UPDATE").fetchone()
            assert locked is not None
            sold, total = locked
            if total - sold < quantity:
                return SoldOut(quantity, total - sold)
            row = conn.execute("UPDATE stock SET sold = sold + %s RETURNING sold, total",
                               (quantity,)).fetchone()
            assert row is not None
        if self._chore_s:
            time.sleep(self._chore_s)  # the lesson's chore, inside the lock
        sold, total = row
        first = sold - quantity + 1
        conn.execute("INSERT INTO sales (first_serial, count, sold_at) VALUES (%s, %s, %s)",
                     (first, quantity, moment))
        return Sale(range(first, sold + 1), total - sold)

    @staticmethod
    def _replay(conn: Connection[Any], key: str, quantity: int) -> Sale | SoldOut:
        row = conn.execute("SELECT quantity, first_serial, count, remaining, created "
                           "FROM receipts WHERE key = %s", (key,)).fetchone()
        assert row is not None  # the claim saw it, and we hold its lock
        first_quantity, first, count, remaining, created = row
        serials = range(first, first + count) if count else range(0)
        receipt = Receipt(first_quantity, serials, remaining, created.timestamp())
        try:
            return receipt.replay(key, quantity)
        except SoldOut as sold_out:
            return sold_out

    def _maybe_purge(self) -> None:
        """Delete a batch of expired receipts, at most every ``PURGE_EVERY_S`` per process."""
        now = self._clock()
        with self._purge_lock:
            if now < self._next_purge:
                return
            self._next_purge = now + self._purge_every
        cutoff = datetime.fromtimestamp(now - self._key_ttl, UTC)
        self._transaction(lambda conn: conn.execute(PURGE, (cutoff, PURGE_BATCH)))

    def counts(self) -> Counts:
        row = self._transaction(
            lambda conn: conn.execute("SELECT total, sold FROM stock").fetchone())
        assert row is not None
        return Counts(int(row[0]), int(row[1]))

    def sold_at(self, serial: int) -> datetime | None:
        if not 1 <= serial <= MAX_SERIAL:
            return None
        # The sale with the greatest first serial not above ``serial`` (one index probe);
        # the serial is sold when that sale reaches it.
        row = self._transaction(lambda conn: conn.execute(
            "SELECT first_serial, count, sold_at FROM sales WHERE first_serial <= %s "
            "ORDER BY first_serial DESC LIMIT 1", (serial,)).fetchone())
        if row is None or serial >= row[0] + row[1]:
            return None
        moment: datetime = row[2]
        return moment.astimezone(UTC)

    def restock(self, tickets: int) -> Counts:
        row = self._transaction(lambda conn: conn.execute(
            "UPDATE stock SET total = total + %s RETURNING total, sold",
            (tickets,)).fetchone())
        assert row is not None
        return Counts(int(row[0]), int(row[1]))

    def check(self) -> None:
        self._transaction(lambda conn: conn.execute("SELECT 1"))

    def close(self) -> None:
        self._pool.close(timeout=5.0)
