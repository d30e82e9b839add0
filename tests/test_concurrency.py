"""The lesson's promise under real threads: exactly the stock is sold, no serial twice."""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator

import pytest

from app.inventory import SoldOut, Store
from tests.conftest import Stores, run_threads

BUYERS = 64
STOCK = 1000


@pytest.fixture
def eager_switching() -> Iterator[None]:
    """Switch threads far more often than usual, so that a missing lock shows at once."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def buy_until_sold_out(store: Store, buyers: int) -> list[list[int]]:
    start = threading.Barrier(buyers)
    bought: list[list[int]] = [[] for _ in range(buyers)]

    def booth(index: int) -> None:
        chooser = random.Random(index)
        start.wait()
        for _ in range(STOCK + 1):  # bounded: every pass sells at least one ticket
            try:
                bought[index].extend(store.sell(chooser.randint(1, 10)).serials)
            except SoldOut as sold_out:
                if sold_out.remaining == 0:
                    return
                # Fewer left than we asked for: ask for what remains at most.
                try:
                    bought[index].extend(store.sell(1).serials)
                except SoldOut:
                    return

    run_threads(booth, buyers, timeout=60)
    return bought


@pytest.mark.parametrize("chore_ms", [0, 0.05], ids=["no-chore", "chore-in-lock"])
def test_threads_sell_exactly_the_stock(make_store: Stores, eager_switching: None,
                                        chore_ms: float) -> None:
    store = make_store(STOCK, chore_ms=chore_ms)
    bought = buy_until_sold_out(store, BUYERS)
    serials = [serial for booth in bought for serial in booth]
    assert len(serials) == STOCK
    assert len(set(serials)) == STOCK, "a serial was sold twice"
    assert set(serials) == set(range(1, STOCK + 1))
    counts = store.counts()
    assert (counts.sold, counts.remaining) == (STOCK, 0)
