"""The store contract for orders that share one group-commit batch.

A batch is sold in arrival order, greedily, all or nothing per order: keyed and keyless
orders mixed, a key repeated inside the batch, quantities that straddle sold-out. The
durable stores are made to gather the orders into one batch (their writer is held up by a
lock taken from outside, through the database itself, while the orders queue); the memory
store sells them one at a time, and must give the same answers.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from app.inventory import IdempotencyKeyReuse, Outcome, Sale, SoldOut, Store
from tests.conftest import Stores, poll

# (quantity, key) in arrival order, after one keyless sale of 1 from a stock of 7 (6 left),
# and each order's expected outcome: serials, "sold out", "reuse", or ("replay", serials).
BATCH: list[tuple[int, str | None]] = [(3, "k1"), (5, None), (2, "k2"), (3, "k1"), (1, "k2"),
                                       (1, None)]
EXPECTED: list[object] = [[2, 3, 4], "sold out", [5, 6], ("replay", [2, 3, 4]), "reuse", [7]]
REMAINING = [3, 3, 1, 3, None, 0]


@contextmanager
def writer_held(kind: str, url: str) -> Iterator[None]:
    """Hold the store's next commit back until the block ends (durable stores)."""
    if kind == "sqlite":
        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        db.execute("BEGIN IMMEDIATE")  # the writer's next commit waits for this lock
        try:
            yield
        finally:
            db.execute("ROLLBACK")
            db.close()
    elif kind == "postgres":
        with psycopg.connect(url) as conn:
            conn.execute("SELECT 1 FROM stock FOR UPDATE")  # the stock row's lock
            yield
            conn.rollback()
    else:
        yield


def sale_rows(kind: str, url: str) -> list[tuple[int, int]]:
    query = "SELECT first_serial, count FROM sales ORDER BY first_serial"
    if kind == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return [tuple(row) for row in db.execute(query)]  # type: ignore[misc]
    with psycopg.connect(url) as conn:
        return [tuple(row) for row in conn.execute(query)]  # type: ignore[misc]


def sell_as_one_batch(kind: str, url: str, store: Store,
                      batch: list[tuple[int, str | None]] = BATCH) -> list[Outcome]:
    """Sell 1, then ``batch`` while the writer is busy with that first sale."""
    if kind == "memory":
        store.sell(1)
        outcomes: list[Outcome] = []
        for quantity, key in batch:
            try:
                outcomes.append(store.sell(quantity, key))
            except Exception as error:
                outcomes.append(error)
        return outcomes
    told: list[tuple[int, Outcome]] = []
    all_told = threading.Semaphore(0)

    def done(index: int) -> object:
        def tell(outcome: Outcome) -> None:
            told.append((index, outcome))
            all_told.release()
        return tell

    with writer_held(kind, url):
        store.sell_later(1, None, done(-1))  # type: ignore[attr-defined]
        # The writer takes the first order alone, and is held up committing it.
        orders = store._orders  # type: ignore[attr-defined]
        poll(lambda: not orders.pending, "the writer to take the first order")
        for index, (quantity, key) in enumerate(batch):
            store.sell_later(quantity, key, done(index))  # type: ignore[attr-defined]
    for _ in range(len(batch) + 1):
        assert all_told.acquire(timeout=30), "an order was never told its outcome"
    first = dict(told).pop(-1)
    assert isinstance(first, Sale) and list(first.serials) == [1]
    return [outcome for _, outcome in sorted(told) if _ >= 0]


def test_a_batch_sells_in_arrival_order_greedily(make_store: Stores) -> None:
    store = make_store(7)
    outcomes = sell_as_one_batch(make_store.kind, make_store.url, store)
    for outcome, expected, remaining in zip(outcomes, EXPECTED, REMAINING, strict=True):
        if expected == "sold out":
            assert isinstance(outcome, SoldOut) and not outcome.replayed
            assert outcome.remaining == remaining
        elif expected == "reuse":
            assert isinstance(outcome, IdempotencyKeyReuse)
        elif isinstance(expected, tuple):
            assert isinstance(outcome, Sale) and outcome.replayed
            assert list(outcome.serials) == expected[1] and outcome.remaining == remaining
        else:
            assert isinstance(outcome, Sale) and not outcome.replayed, outcome
            assert list(outcome.serials) == expected and outcome.remaining == remaining
    assert store.counts().sold == 7
    if make_store.kind != "memory":
        # The first sale alone, then the whole batch in one transaction: one row each.
        assert sale_rows(make_store.kind, make_store.url) == [(1, 1), (2, 6)]


@pytest.mark.parametrize(("held", "quantities", "expected"), [
    (0, [3, 2, 1], [[2, 3, 4], [5, 6], [7]]),  # the stock covers the batch exactly
    (0, [3, 2, 2], [[2, 3, 4], [5, 6], None]),  # short by one: the last is sold out
    (2, [3, 1], [[2, 3, 4], [5]]),  # exactly what is not held
    (2, [3, 2, 1], [[2, 3, 4], None, [5]]),  # the held tickets are not for sale
])
def test_a_keyless_batch_sells_whole_or_greedily_around_held_tickets(
        make_store: Stores, held: int, quantities: list[int],
        expected: list[list[int] | None]) -> None:
    """Keyless batches the stock covers whole take PostgreSQL's one-statement path, the
    others the greedy one: the answers are the same either way, on every store."""
    store = make_store(7)
    if held:
        store.hold(held, 600)
    outcomes = sell_as_one_batch(make_store.kind, make_store.url, store,
                                 [(quantity, None) for quantity in quantities])
    left = 6 - held
    for outcome, quantity, serials in zip(outcomes, quantities, expected, strict=True):
        if serials is None:
            assert isinstance(outcome, SoldOut) and outcome.remaining == left, outcome
        else:
            left -= quantity
            assert isinstance(outcome, Sale), outcome
            assert list(outcome.serials) == serials and outcome.remaining == left
    counts = store.counts()
    assert (counts.sold, counts.held) == (7 - held - left, held)
    if make_store.kind != "memory":
        assert sale_rows(make_store.kind, make_store.url) == [(1, 1), (2, 6 - held - left)]


@pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])
def test_the_batch_answers_replay_after_restart(make_store: Stores) -> None:
    store = make_store(7)
    sell_as_one_batch(make_store.kind, make_store.url, store)
    store.close()
    make_store.opened.remove(store)
    again = make_store(7)
    replay = again.sell(3, "k1")
    assert replay.replayed and list(replay.serials) == [2, 3, 4]
    with pytest.raises(IdempotencyKeyReuse):
        again.sell(1, "k2")
    assert again.counts().sold == 7
