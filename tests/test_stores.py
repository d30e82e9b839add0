"""The store contract: every backend passes this same suite."""

from __future__ import annotations

import pytest

from app.inventory import (
    Booth,
    IdempotencyKeyInFlight,
    IdempotencyKeyReuse,
    InvalidQuantity,
    SoldOut,
)
from tests.conftest import FakeClock, Stores

# (stock, quantities bought in turn, expected outcome of each: serials or "sold out")
SALES = [
    pytest.param(10, [1], [[1]], id="one"),
    pytest.param(10, [3, 2], [[1, 2, 3], [4, 5]], id="consecutive-serials"),
    pytest.param(5, [5], [[1, 2, 3, 4, 5]], id="exactly-the-stock"),
    pytest.param(5, [6], ["sold out"], id="more-than-stock"),
    pytest.param(5, [4, 2, 1], [[1, 2, 3, 4], "sold out", [5]], id="all-or-nothing"),
    pytest.param(3, [3, 1], [[1, 2, 3], "sold out"], id="after-sold-out"),
    pytest.param(0, [1], ["sold out"], id="empty-stock"),
]


@pytest.mark.parametrize(("stock", "quantities", "expected"), SALES)
def test_sales_are_all_or_nothing(make_store: Stores, stock: int, quantities: list[int],
                                  expected: list[object]) -> None:
    store = make_store(stock)
    sold = 0
    for quantity, outcome in zip(quantities, expected, strict=True):
        if outcome == "sold out":
            with pytest.raises(SoldOut) as error:
                store.sell(quantity)
            assert error.value.remaining == stock - sold
            assert not error.value.replayed
        else:
            sale = store.sell(quantity)
            sold += quantity
            assert list(sale.serials) == outcome
            assert sale.remaining == stock - sold
            assert not sale.replayed
        counts = store.counts()
        assert (counts.total, counts.sold, counts.remaining) == (stock, sold, stock - sold)


def test_sold_at_knows_sold_tickets_only(make_store: Stores) -> None:
    clock = FakeClock()
    store = make_store(10, clock=clock)
    store.sell(2)
    clock.advance(60)
    store.sell(1)
    first, third = store.sold_at(1), store.sold_at(3)
    assert first is not None and third is not None
    assert first.timestamp() == pytest.approx(clock.now - 60, abs=1e-3)
    assert third.timestamp() == pytest.approx(clock.now, abs=1e-3)
    assert store.sold_at(2) == first
    for unsold in (0, -1, 4, 10, 11, 10**15):
        assert store.sold_at(unsold) is None


def test_restock_adds_serials_after_the_last(make_store: Stores) -> None:
    store = make_store(2)
    store.sell(2)
    with pytest.raises(SoldOut):
        store.sell(1)
    counts = store.restock(3)
    assert (counts.total, counts.sold, counts.remaining) == (5, 2, 3)
    assert list(store.sell(3).serials) == [3, 4, 5]


def test_idempotent_retry_replays_the_sale(make_store: Stores) -> None:
    store = make_store(10)
    first = store.sell(2, "key-1")
    again = store.sell(2, "key-1")
    assert list(again.serials) == list(first.serials) == [1, 2]
    assert again.remaining == first.remaining == 8
    assert again.replayed and not first.replayed
    assert store.counts().sold == 2


def test_idempotent_retry_replays_sold_out(make_store: Stores) -> None:
    store = make_store(1)
    with pytest.raises(SoldOut):
        store.sell(2, "key-2")
    store.restock(5)  # the stock changed, but the key's answer did not
    with pytest.raises(SoldOut) as error:
        store.sell(2, "key-2")
    assert error.value.replayed and error.value.remaining == 1
    assert store.counts().sold == 0


def test_key_reused_for_another_quantity_is_refused(make_store: Stores) -> None:
    store = make_store(10)
    store.sell(1, "key-3")
    with pytest.raises(IdempotencyKeyReuse):
        store.sell(2, "key-3")
    assert store.counts().sold == 1


def test_keys_are_forgotten_after_their_ttl(make_store: Stores) -> None:
    clock = FakeClock()
    store = make_store(10, clock=clock, idempotency_ttl=100)
    store.sell(1, "old")
    clock.advance(99)
    assert store.sell(1, "old").replayed
    clock.advance(2)
    fresh = store.sell(1, "old")
    assert not fresh.replayed and list(fresh.serials) == [2]
    assert store.counts().sold == 2


@pytest.mark.parametrize("quantity", [0, -1, 11, 10**9])
def test_booth_refuses_quantities_outside_its_limit(make_store: Stores, quantity: int) -> None:
    booth = Booth(make_store(100), max_per_request=10)
    with pytest.raises(InvalidQuantity):
        booth.buy(quantity)
    assert booth.store.counts().sold == 0


def test_booth_refuses_a_key_still_in_flight(make_store: Stores) -> None:
    booth = Booth(make_store(100), max_per_request=10)
    booth._take("busy")  # as a request in flight holds its key
    with pytest.raises(IdempotencyKeyInFlight):
        booth.buy(1, "busy")
    booth._release("busy")
    assert booth.store.counts().sold == 0
    assert booth.buy(1, "busy").serials == range(1, 2)  # released afterwards
