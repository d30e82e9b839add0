"""The PostgreSQL store: one database shared by any number of service processes.

Sales go through the group commit (:mod:`app.groupcommit`); this module is its backend for
PostgreSQL. A whole batch is sold by one call of a server-side function,
``ticketbooth_sell``, sent on a writer's own connection in autocommit mode (``WRITERS``
of them, used one at a time while the database answers fast, pipelined when it is far
away: see :mod:`app.groupcommit`): the statement and its commit travel in one round
trip, and the stock row's lock (the lesson's lock, which works across processes and
machines) is taken inside the function and released by the commit, so it is never held
while the network carries a message. The function sells the
batch in arrival order, greedily, writes one row of ``sales`` for the batch's consecutive
serials, and writes each keyed order's receipt in the same transaction. A batch of keyless
sales that the stock covers whole, the common case, takes a cheaper path of the same shape:
one plain statement (``SELL_WHOLE``), the stock row's UPDATE and the sale's row.

Holds are orders of the same batches: the function creates, confirms and releases them
under the same lock, with ``stock.held`` counting the tickets of live holds. Expiry is
judged by the database's clock, read once the lock is taken, so instances with skewed clocks
agree; an expired hold stops counting at once (the function subtracts the expired live
holds, found through a partial index), and ``ticketbooth_expire`` cleans them up in small
batches, called by each instance's writer now and then (each hold is expired by one call).

Idempotency keys across instances: the function reads and writes receipts only while it
holds the stock row's lock, so batches from every instance take their turns, each sees the
receipts of every batch committed before it (and replays them), and no batch ever waits for
another's keys: nothing to deadlock on. Receipts older than the TTL count as absent (a new
sale takes the key over) and are purged in small batches. As ``receipts`` grows, a writer
analyzes it now and then (see ``ANALYZE_GROWTH``), so that no connection keeps a plan that
scans the whole table for a batch's keys.

Failures: a batch refused by the database (an error it reports) was rolled back, and its
orders answer 503 ``store_unavailable``; one whose connection was lost after it was sent
may or may not have committed, and its orders answer 504 ``outcome_unknown`` (a retry with
the same Idempotency-Key tells). The writer reconnects by itself. Reads come from a
psycopg_pool pool with short timeouts, so that while the database is away they answer 503
within seconds.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import Connection
from psycopg import abc as adaptation
from psycopg.adapt import PyFormat, Transformer
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import DiagnosticField, ExecStatus, TransactionStatus
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from app.groupcommit import Batch, GroupCommit, GroupCommitted, Order
from app.inventory import (
    Counts,
    Hold,
    HoldNotFound,
    OutcomeUnknown,
    Receipt,
    Sale,
    SoldOut,
    StoreUnavailable,
    judge,
)
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
#: Expired holds are cleaned up at most this often per process, this many at a time (at
#: once again while a batch comes back full).
EXPIRE_EVERY_S = 1.0
EXPIRE_BATCH = 100
#: Every so often a writer looks at how big ``receipts`` has grown, and analyzes it when it
#: first finds receipts there and then whenever it has grown this many times over since.
#: A connection keeps the plans of ``ticketbooth_sell`` that it made while the table was
#: small (a new database): until the table is analyzed they scan all of it for a batch's
#: keys (54 ms a batch of 40 at 60,000 receipts), and autovacuum may come round late or
#: never. Analyzing replans them on every connection; it happens a few times over the
#: table's life, the first ones at small sizes.
ANALYZE_CHECK_EVERY_S = 5.0
ANALYZE_GROWTH = 4
#: Writers, each with its own connection: batches take turns on them, and are pipelined
#: when the database is far away (app.groupcommit). They cost a connection each, idle
#: while the database answers fast. Two batches on their way at once are enough: with
#: more, each leaves smaller and the commits cost more CPU per sale, here and in the
#: database, for no more sales (docs/performance.md).
WRITERS = 2
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
    # Holds: ``stock.held`` is the sum of the holds whose state is 'held', expired or not;
    # the tickets held at an instant are that minus the expired ones not yet cleaned up
    # (found through the partial index, which holds only live holds).
    "ALTER TABLE stock ADD COLUMN IF NOT EXISTS held bigint NOT NULL DEFAULT 0",
    "ALTER TABLE receipts ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'buy'",
    "ALTER TABLE receipts ADD COLUMN IF NOT EXISTS hold_id text",
    "ALTER TABLE receipts ADD COLUMN IF NOT EXISTS expires_at timestamptz",
    """CREATE TABLE IF NOT EXISTS holds (
        id text PRIMARY KEY,
        quantity integer NOT NULL CHECK (quantity > 0),
        expires_at timestamptz NOT NULL,
        state text NOT NULL CHECK (state IN ('held', 'confirmed', 'released', 'expired')),
        first_serial bigint
    )""",
    "CREATE INDEX IF NOT EXISTS holds_live ON holds (expires_at) WHERE state = 'held'",
    "DROP FUNCTION IF EXISTS ticketbooth_sell(integer[], text[], timestamptz, timestamptz, "
    "double precision)",
    # Commit a batch: one row per order, in order. Kinds: 'sell', 'hold', 'confirm',
    # 'release'; an array left NULL means every order has the default there (a sell, no
    # key, no hold id, no ttl), so that a batch of keyless sales sends one array. For a
    # sell or hold replayed from a receipt, the row carries the receipt (o_kind 'buy' or
    # 'hold'; the caller tells a replay from a reuse of the key);
    # otherwise o_count is 0 when the order was sold out, and o_remaining is what was left
    # after it. A new hold has o_state 'held'; a confirm or release has the hold's state
    # after it (NULL for an unknown id), o_replayed when it changed nothing.
    # Everything happens under the stock row's lock, receipts and holds included: only
    # the lock holder reads or writes them, so no batch ever waits for another's keys or
    # holds, and nothing can deadlock.
    """CREATE OR REPLACE FUNCTION ticketbooth_sell(
        p_kinds text[], p_quantities integer[], p_keys text[], p_ids text[],
        p_ttls double precision[], p_at timestamptz, p_cutoff timestamptz,
        p_chore double precision)
    RETURNS TABLE (o_quantity integer, o_first bigint, o_count integer, o_remaining bigint,
                   o_replayed boolean, o_kind text, o_id text, o_state text,
                   o_expires timestamptz)
    LANGUAGE plpgsql AS $$
    DECLARE
        -- The live receipts of this batch's keys: those of earlier batches (the first
        -- v_earlier), then those of the keyed orders done here, which it writes.
        live_keys text[] := '{}';
        live_q integer[] := '{}';
        live_f bigint[] := '{}';
        live_c integer[] := '{}';
        live_r bigint[] := '{}';
        live_k text[] := '{}';
        live_i text[] := '{}';
        live_e timestamptz[] := '{}';
        v_earlier integer := 0;
        v_expired integer := 0;  -- receipts of this batch's keys past their TTL
        v_sold bigint;
        v_total bigint;
        v_held bigint;  -- stock.held: live holds, expired ones not cleaned up included
        v_stale bigint;  -- of which expired
        v_start bigint;
        v_held_start bigint;
        v_key text;
        v_kind text;
        v_at integer;
        v_state text;
        v_first bigint;
        v_now timestamptz;  -- expiry is judged at the moment the lock is taken
    BEGIN
        SELECT s.sold, s.total, s.held INTO v_sold, v_total, v_held FROM stock s FOR UPDATE;
        v_now := clock_timestamp();
        -- One probe of the partial index, which holds live holds only.
        SELECT coalesce(sum(h.quantity), 0) INTO v_stale FROM holds h
        WHERE h.state = 'held' AND h.expires_at <= v_now;
        v_start := v_sold;
        v_held_start := v_held;
        IF cardinality(array_remove(p_keys, NULL)) > 0 THEN
            -- Found by key alone: a condition on created in the WHERE clause lets the
            -- cached plan scan receipts_created, every receipt of the last TTL, instead.
            SELECT array_agg(r.key) FILTER (WHERE live),
                   array_agg(r.quantity) FILTER (WHERE live),
                   array_agg(r.first_serial) FILTER (WHERE live),
                   array_agg(r.count) FILTER (WHERE live),
                   array_agg(r.remaining) FILTER (WHERE live),
                   array_agg(r.kind) FILTER (WHERE live),
                   array_agg(r.hold_id) FILTER (WHERE live),
                   array_agg(r.expires_at) FILTER (WHERE live),
                   count(*) FILTER (WHERE NOT live)
            INTO live_keys, live_q, live_f, live_c, live_r, live_k, live_i, live_e,
                 v_expired
            FROM (SELECT *, created > p_cutoff AS live FROM receipts
                  WHERE key = ANY (array_remove(p_keys, NULL)) OFFSET 0) r;
            v_earlier := coalesce(cardinality(live_keys), 0);
        END IF;
        FOR i IN 1 .. coalesce(cardinality(p_quantities), 0) LOOP
            v_kind := coalesce(p_kinds[i], 'sell');
            v_key := p_keys[i];
            o_replayed := false;
            o_kind := NULL;
            o_id := NULL;
            o_state := NULL;
            o_expires := NULL;
            IF v_kind IN ('confirm', 'release') THEN
                o_id := p_ids[i];
                SELECT h.quantity, h.expires_at, h.state, h.first_serial
                INTO o_quantity, o_expires, v_state, v_first
                FROM holds h WHERE h.id = p_ids[i];
                IF NOT FOUND THEN
                    o_quantity := 0;
                    o_replayed := true;
                END IF;
                o_first := v_first;
                o_count := CASE WHEN v_first IS NULL THEN 0 ELSE o_quantity END;
                IF v_state IS NULL THEN
                    NULL;  -- no such hold
                ELSIF v_state = 'held' AND o_expires <= v_now THEN
                    o_state := 'expired';
                    o_replayed := true;
                ELSIF v_state = 'held' AND v_kind = 'confirm' THEN
                    IF p_chore > 0 THEN
                        PERFORM pg_sleep(p_chore);  -- the lesson's chore, inside the lock
                    END IF;
                    o_first := v_sold + 1;
                    o_count := o_quantity;
                    v_sold := v_sold + o_quantity;
                    v_held := v_held - o_quantity;
                    o_state := 'confirmed';
                    UPDATE holds SET state = 'confirmed', first_serial = o_first
                    WHERE id = p_ids[i];
                ELSIF v_state = 'held' THEN
                    v_held := v_held - o_quantity;
                    o_state := 'released';
                    UPDATE holds SET state = 'released' WHERE id = p_ids[i];
                ELSE
                    o_state := v_state;
                    o_replayed := true;
                END IF;
                o_remaining := v_total - v_sold - (v_held - v_stale);
                RETURN NEXT;
                CONTINUE;
            END IF;
            IF v_key IS NOT NULL THEN
                -- A live receipt, of an earlier batch or of this one: its answer again.
                v_at := array_position(live_keys, v_key);
                IF v_at IS NOT NULL THEN
                    o_quantity := live_q[v_at];
                    o_first := live_f[v_at];
                    o_count := live_c[v_at];
                    o_remaining := live_r[v_at];
                    o_kind := live_k[v_at];
                    o_id := live_i[v_at];
                    o_expires := live_e[v_at];
                    o_replayed := true;
                END IF;
            END IF;
            IF NOT o_replayed THEN
                o_quantity := p_quantities[i];
                o_first := NULL;
                o_count := 0;
                IF o_quantity > v_total - v_sold - (v_held - v_stale) THEN
                    NULL;  -- sold out
                ELSIF v_kind = 'hold' THEN
                    o_id := p_ids[i];
                    o_state := 'held';
                    o_expires := v_now + make_interval(secs => p_ttls[i]);
                    v_held := v_held + o_quantity;
                    INSERT INTO holds (id, quantity, expires_at, state)
                    VALUES (o_id, o_quantity, o_expires, 'held');
                ELSE
                    IF p_chore > 0 THEN
                        PERFORM pg_sleep(p_chore);  -- the lesson's chore, inside the lock
                    END IF;
                    o_first := v_sold + 1;
                    o_count := o_quantity;
                    v_sold := v_sold + o_quantity;
                END IF;
                o_remaining := v_total - v_sold - (v_held - v_stale);
                o_kind := CASE WHEN v_kind = 'hold' THEN 'hold' ELSE 'buy' END;
                IF v_key IS NOT NULL THEN
                    live_keys := live_keys || v_key;
                    live_q := live_q || o_quantity;
                    live_f := live_f || o_first;
                    live_c := live_c || o_count;
                    live_r := live_r || o_remaining;
                    live_k := live_k || o_kind;
                    live_i := live_i || o_id;
                    live_e := live_e || o_expires;
                END IF;
            END IF;
            RETURN NEXT;
        END LOOP;
        IF v_sold > v_start OR v_held <> v_held_start THEN
            UPDATE stock SET sold = v_sold, held = v_held;
        END IF;
        IF v_sold > v_start THEN
            INSERT INTO sales (first_serial, count, sold_at)
            VALUES (v_start + 1, v_sold - v_start, p_at);
        END IF;
        IF cardinality(live_keys) > v_earlier THEN
            -- New keys. An expired receipt of one (rare: a key used again after its TTL)
            -- is deleted first, so that a plain INSERT will do: an upsert's speculative
            -- insertion cost about half again as much per receipt.
            IF v_expired > 0 THEN
                DELETE FROM receipts
                WHERE key = ANY (live_keys[v_earlier + 1:]) AND created <= p_cutoff;
            END IF;
            INSERT INTO receipts (key, quantity, first_serial, count, remaining, created,
                                  kind, hold_id, expires_at)
            SELECT u.k, u.q, u.f, u.c, u.rem, p_at, u.kd, u.i, u.e
            FROM unnest(live_keys[v_earlier + 1:], live_q[v_earlier + 1:],
                        live_f[v_earlier + 1:], live_c[v_earlier + 1:],
                        live_r[v_earlier + 1:], live_k[v_earlier + 1:],
                        live_i[v_earlier + 1:], live_e[v_earlier + 1:])
                AS u(k, q, f, c, rem, kd, i, e);
        END IF;
    END
    $$""",
    # Clean up a small batch of expired holds: marked expired, their tickets taken off
    # stock.held (they stopped counting at their expiry already), under the stock row's
    # lock like every change to holds. Returns how many this call expired.
    """CREATE OR REPLACE FUNCTION ticketbooth_expire(p_limit integer)
    RETURNS integer
    LANGUAGE plpgsql AS $$
    DECLARE
        v_count integer;
        v_quantity bigint;
        v_now timestamptz;
    BEGIN
        PERFORM 1 FROM stock FOR UPDATE;
        v_now := clock_timestamp();
        WITH due AS (
            SELECT h.id FROM holds h
            WHERE h.state = 'held' AND h.expires_at <= v_now
            ORDER BY h.expires_at LIMIT p_limit),
        expired AS (
            UPDATE holds h SET state = 'expired' FROM due WHERE h.id = due.id
            RETURNING h.quantity)
        SELECT count(*), coalesce(sum(expired.quantity), 0) INTO v_count, v_quantity
        FROM expired;
        IF v_count > 0 THEN
            UPDATE stock SET held = held - v_quantity;
        END IF;
        RETURN v_count;
    END
    $$""",
)

# Each row ends with the seconds the database spent on the batch so far (the function
# has run to its end when the rows are read): the group commit tells the trip from it.
# Prepared on each writer's connection, under SELL_NAME.
SELL = (b"SELECT *, extract(epoch FROM clock_timestamp() - statement_timestamp())::float8 "
        b"FROM ticketbooth_sell($1::text[], $2::integer[], $3::text[], $4::text[], "
        b"$5::double precision[], $6::timestamptz, $7::timestamptz, $8::double precision)")
SELL_NAME = b"ticketbooth_sell"
# A batch of keyless sales that the stock covers whole, the common case under load, in one
# plain statement: the stock row's UPDATE takes its lock and adds the batch's $1 tickets,
# but only when what is neither sold nor held (expired holds not cleaned up counted as
# held) covers them all, and the sale's row is written. It answers one row, the serial
# before the batch's first, the total, the tickets held now and the seconds spent (as the
# function's rows end), from which the writer works out each order's serials; or no row
# when the stock might not cover the batch: then the function sells it, greedily. It costs
# PostgreSQL about half the CPU of the function for a batch of 32 (plpgsql runs its
# statements one by one and returns a row per order), and a batch is what two instances
# pay half as many tickets for. Prepared under SELL_WHOLE_NAME.
SELL_WHOLE = b"""
    WITH s AS (UPDATE stock SET sold = sold + $1::bigint
               WHERE total - sold - held >= $1::bigint
               RETURNING sold - $1::bigint AS start, total,
                         held - (SELECT coalesce(sum(h.quantity), 0) FROM holds h
                                 WHERE h.state = 'held'
                                   AND h.expires_at <= clock_timestamp()) AS live_held),
    sale AS (INSERT INTO sales (first_serial, count, sold_at)
             SELECT s.start + 1, $1::bigint, $2::timestamptz FROM s)
    SELECT start, total, live_held,
           extract(epoch FROM clock_timestamp() - statement_timestamp())::float8
    FROM s"""
SELL_WHOLE_NAME = b"ticketbooth_sell_whole"
EXPIRE = "SELECT ticketbooth_expire(%s)"
#: Tickets held now: the live holds less those expired and not yet cleaned up.
COUNTS = """
    SELECT total, sold, held - (SELECT coalesce(sum(quantity), 0) FROM holds
                                WHERE state = 'held' AND expires_at <= now())
    FROM stock
"""
HOLD = """
    SELECT quantity, extract(epoch FROM expires_at)::float8, state, first_serial,
           extract(epoch FROM now())::float8
    FROM holds WHERE id = %s
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


class _WriterConnection:
    """The writer's own connection, in autocommit mode: each statement is its own
    transaction, sent and committed in one round trip. Reconnects when lost.

    A batch goes through libpq directly (``psycopg.pq``): the statement prepared once per
    connection, its parameters dumped and its rows loaded by one psycopg Transformer kept
    with the connection, one send and one wait. ``Connection.execute`` makes a cursor, a
    transformer and a conversion of the query for each call, which doubles the writer's
    CPU per batch; and a batch's cost is what two instances, with half the batch each,
    pay twice as often.
    """

    def __init__(self, url: str, options: dict[str, Any], where: str) -> None:
        self._url = url
        self._options = options
        self._where = where
        self._conn: Connection[Any] | None = None
        self._adapt: adaptation.Transformer | None = None  # for self._conn

    def sell(self, params: tuple[Any, ...], name: bytes = SELL_NAME
             ) -> list[tuple[Any, ...]]:
        """Run the prepared batch statement ``name`` (SELL, or SELL_WHOLE) with
        ``params``; its rows. Raises as :meth:`run` does."""
        conn = self._connection()
        adapt = self._adapt
        assert adapt is not None
        pgconn = conn.pgconn
        results = []
        lost: psycopg.Error | None = None
        try:
            values = adapt.dump_sequence(params, [PyFormat.TEXT] * len(params))
            pgconn.send_query_prepared(name, values)
            while pgconn.flush():
                select.select([], [pgconn.socket], [])
            while True:
                while pgconn.is_busy():
                    select.select([pgconn.socket], [], [])
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:
                    break
                results.append(result)
        except psycopg.Error as error:
            lost = error
        refused = [result for result in results if result.status != ExecStatus.TUPLES_OK]
        if refused:
            # The database's own error comes first (a terminated backend says why, then
            # libpq reports the connection closed).
            message = refused[0].error_message.decode(errors="replace") or "failed"
            raise self._failed(conn, psycopg.OperationalError(message),
                               refused[0].error_field(DiagnosticField.SQLSTATE))
        if lost is not None or len(results) != 1:
            raise self._failed(conn, lost or psycopg.OperationalError("no result"), None)
        adapt.set_pgresult(results[0])
        return adapt.load_rows(0, results[0].ntuples, tuple)

    def run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run one statement; raise StoreUnavailable when it certainly did not commit,
        OutcomeUnknown when the connection was lost before its answer came."""
        conn = self._connection()
        try:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
        except psycopg.Error as error:
            raise self._failed(conn, error, error.sqlstate) from error

    def _failed(self, conn: Connection[Any], error: psycopg.Error,
                sqlstate: str | bytes | None) -> StoreUnavailable | OutcomeUnknown:
        """What a failed statement means, ``sqlstate`` being the database's error code
        (None when the database did not answer)."""
        log.warning("PostgreSQL at %s failed: %s", self._where, _one_line(error))
        if conn.broken:
            self.close()
            if sqlstate is None:
                return OutcomeUnknown(
                    "the connection to the ticket database was lost while it committed; "
                    "the sale may have been recorded: retry with the same Idempotency-Key "
                    "to learn its outcome")
        # The database answered with an error: the statement, and with it the
        # transaction, was rolled back.
        return StoreUnavailable("the ticket database refused the sale; nothing was sold")

    def _connection(self) -> Connection[Any]:
        conn = self._conn
        if conn is not None and (conn.closed or _has_news(conn)):
            # Lost, or the server spoke unasked (it says goodbye before it closes an idle
            # connection, at a restart): start afresh before sending anything.
            self.close()
            conn = None
        if conn is None:
            try:
                conn = psycopg.connect(self._url, autocommit=True, **self._options)
                for name, statement in ((SELL_NAME, SELL), (SELL_WHOLE_NAME, SELL_WHOLE)):
                    prepared = conn.pgconn.prepare(name, statement)
                    if prepared.status != ExecStatus.COMMAND_OK:
                        conn.close()
                        raise psycopg.OperationalError(
                            prepared.error_message.decode(errors="replace"))
            except psycopg.Error as error:
                log.warning("PostgreSQL at %s unavailable: %s", self._where, _one_line(error))
                raise StoreUnavailable("the ticket database cannot be reached; nothing was "
                                       "sold") from error
            self._conn = conn
            self._adapt = Transformer.from_context(conn)
        return conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
            self._adapt = None


def _has_news(conn: Connection[Any]) -> bool:
    """Whether an idle connection's socket has something to read (or was closed)."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class PostgresStore(GroupCommitted):
    """Tickets in a PostgreSQL database that several service processes may share."""

    def __init__(self, url: str, tickets: int, *, pool_size: int = 10, chore_s: float = 0.0,
                 key_ttl: float = 86400.0, order_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._chore_s = chore_s
        self._key_ttl = key_ttl
        self._clock = clock
        self._pool_size = pool_size
        self._where = _where(url)
        self._purge_every = min(PURGE_EVERY_S, key_ttl)
        self._next_purge = float("-inf")
        self._next_expiry = float("-inf")
        self._next_size_check = float("-inf")
        self._analyzed_bytes = 0  # receipts' size when last analyzed here
        self._expired = 0
        # Whether the last keyless batch left stock for another like it (see SELL_WHOLE).
        self._stock_covers = True
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
        self._writers = [_WriterConnection(url, options, self._where)
                         for _ in range(WRITERS)]
        self._orders = GroupCommit([functools.partial(self._commit_batch, writer)
                                    for writer in self._writers], "postgres-writer",
                                   timeout=order_timeout,
                                   housekeeping=self._housekeeping)

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


    def get_hold(self, hold_id: str) -> Hold | None:
        row = self._transaction(lambda conn: conn.execute(HOLD, (hold_id,)).fetchone())
        if row is None:
            return None
        quantity, expires_at, state, first, now = row
        serials = range(first, first + quantity) if first is not None else range(0)
        return Hold(hold_id, quantity, state, expires_at, serials).seen_at(now)

    def holds_expired(self) -> int:
        return self._expired

    # -- selling: the group commit's backend ---------------------------------------------

    def _commit_batch(self, writer: _WriterConnection, batch: Batch) -> float:
        """Commit ``batch`` in one statement, committed with it (see the module's doc)."""
        now = self._clock()
        plain = all(order.kind == "sell" for order in batch)
        keyed = any(order.key is not None for order in batch)
        at = datetime.fromtimestamp(now, UTC)
        whole = plain and not keyed and not self._chore_s  # the chore runs in the function
        tickets = sum(order.quantity for order in batch) if whole else 0
        rows = []
        if whole and self._stock_covers:
            rows = _whole_rows(batch, writer.sell((tickets, at), SELL_WHOLE_NAME))
        if not rows:
            rows = writer.sell((
                None if plain else [order.kind for order in batch],
                # An array literal: cheaper to make than a list for the driver to adapt.
                "{" + ",".join([str(order.quantity) for order in batch]) + "}",
                [order.key for order in batch] if keyed else None,
                None if plain else [order.hold_id for order in batch],
                None if plain else [float(order.ttl) for order in batch],
                at, datetime.fromtimestamp(now - self._key_ttl, UTC), self._chore_s))
        if len(rows) != len(batch):
            raise StoreUnavailable(f"the database answered {len(rows)} outcomes for "
                                   f"{len(batch)} orders")
        if whole:  # near sold out, try the whole batch again once one would fit
            self._stock_covers = rows[-1][3] >= tickets
        for order, row in zip(batch, rows, strict=True):
            try:
                order.result = _outcome(order, row[:-1], now)
            except Exception as refused:  # sold out again, the key reused, a hold's state
                order.result = refused
        spent: float = rows[-1][-1]
        return spent

    def _housekeeping(self, lane: int) -> None:
        """Before a batch, on the connection of the writer about to send it."""
        writer = self._writers[lane]
        self._expire_holds(writer)
        self._purge(writer)
        self._analyze_receipts(writer)

    def _expire_holds(self, writer: _WriterConnection) -> None:
        """Clean up a small batch of expired holds now and then; count those this
        instance expired (each hold is expired by one call, on one instance)."""
        now = time.monotonic()
        if now < self._next_expiry:
            return
        with contextlib.suppress(StoreUnavailable, OutcomeUnknown):
            expired = int(writer.run(EXPIRE, (EXPIRE_BATCH,))[0][0])
            self._expired += expired
            if expired >= EXPIRE_BATCH:
                return  # more are due: again before the next batch
        self._next_expiry = now + EXPIRE_EVERY_S

    def _purge(self, writer: _WriterConnection) -> None:
        """Housekeeping before a batch: delete a batch of expired receipts now and then."""
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + self._purge_every
        with contextlib.suppress(StoreUnavailable, OutcomeUnknown):
            writer.run(PURGE, (datetime.fromtimestamp(now - self._key_ttl, UTC),
                               PURGE_BATCH))

    def _analyze_receipts(self, writer: _WriterConnection) -> None:
        """Analyze ``receipts`` once it has grown ANALYZE_GROWTH times over (see there)."""
        now = time.monotonic()
        if now < self._next_size_check:
            return
        self._next_size_check = now + ANALYZE_CHECK_EVERY_S
        with contextlib.suppress(StoreUnavailable, OutcomeUnknown):
            size = int(writer.run("SELECT pg_relation_size('receipts')", ())[0][0])
            # Once early on (the first look that finds receipts), then as it grows.
            if size and size >= ANALYZE_GROWTH * self._analyzed_bytes:
                writer.run("ANALYZE receipts", ())
                self._analyzed_bytes = size

    def counts(self) -> Counts:
        row = self._transaction(lambda conn: conn.execute(COUNTS).fetchone())
        assert row is not None
        return Counts(int(row[0]), int(row[1]), int(row[2]))

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
            "UPDATE stock SET total = total + %s RETURNING total, sold", (tickets,)).fetchone())
        assert row is not None
        return Counts(int(row[0]), int(row[1]), self.counts().held)

    def check(self) -> None:
        if not self._orders.alive:
            raise StoreUnavailable("the PostgreSQL writer has stopped")
        self._transaction(lambda conn: conn.execute("SELECT 1"))

    def close(self) -> None:
        self._orders.close()
        for writer in self._writers:
            writer.close()
        self._pool.close(timeout=5.0)


def _whole_rows(batch: Batch, answer: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The function's rows for a batch that SELL_WHOLE sold (none when it did not): each
    order's serials follow the quantities before it."""
    if not answer:
        return []
    (start, total, held, spent), = answer
    rows = []
    for order in batch:
        rows.append((order.quantity, start + 1, order.quantity,
                     total - start - order.quantity - held, False, "buy", None, None, None,
                     spent))
        start += order.quantity
    return rows


def _outcome(order: Order, row: tuple[Any, ...], now: float) -> Sale | Hold | Exception:
    """What one row of ``ticketbooth_sell`` answers to ``order``."""
    quantity, first, count, remaining, replayed, kind, hold_id, state, expires = row
    serials = range(first, first + count) if count else range(0)
    expires_at = expires.timestamp() if expires is not None else 0.0
    if order.kind in ("confirm", "release"):
        if state is None:
            return HoldNotFound()
        hold = Hold(hold_id, quantity, state, expires_at, serials)
        if replayed:  # the state is the hold's as the database judged it
            settled = judge(hold, "confirm" if order.kind == "confirm" else "release",
                            float("-inf"))
            assert settled is not None
            hold = settled
            return Sale(serials, remaining, replayed=True) if order.kind == "confirm" else hold
        return Sale(serials, remaining) if order.kind == "confirm" else hold
    if replayed:
        assert order.key is not None
        receipt = Receipt(quantity, serials, remaining, now, kind, hold_id, expires_at)
        if order.kind == "hold":
            return receipt.replay_hold(order.key, order.quantity)
        return receipt.replay(order.key, order.quantity)
    if order.kind == "hold":
        if state == "held":
            return Hold(hold_id, quantity, "held", expires_at)
        return SoldOut(order.quantity, remaining)
    if serials:
        return Sale(serials, remaining)
    return SoldOut(order.quantity, remaining)
