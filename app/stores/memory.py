"""The in-memory store: the lesson's shared counter, guarded by one ``threading.Lock``."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime

from app.inventory import Counts, Receipt, Sale, SoldOut

__all__ = ["MemoryStore", "ReceiptBook"]


class ReceiptBook:
    """Idempotency receipts in first-use order, forgotten ``ttl`` seconds after first use.

    Not thread-safe on its own: callers hold their store's lock.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.clock = clock
        self._receipts: dict[str, Receipt] = {}

    def get(self, key: str) -> Receipt | None:
        self._forget_expired()
        return self._receipts.get(key)

    def put(self, key: str, receipt: Receipt) -> None:
        self._receipts[key] = receipt

    def _forget_expired(self) -> None:
        now = self.clock()
        receipts = self._receipts
        while receipts:
            oldest = next(iter(receipts))
            if not receipts[oldest].expired(now, self.ttl):
                break
            del receipts[oldest]


class MemoryStore:
    """Tickets in process memory. Fast, correct under any number of threads, not durable."""

    def __init__(self, tickets: int, *, chore_s: float = 0.0, key_ttl: float = 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._lock: AbstractContextManager[object] = threading.Lock()
        self._total = tickets
        self._sold = 0
        self._chore_s = chore_s
        self._clock = clock
        # One (first serial, time sold) per sale; a sale's serials are consecutive.
        self._sales: list[tuple[int, float]] = []
        self._receipts = ReceiptBook(key_ttl, clock)

    def sell(self, quantity: int, key: str | None = None) -> Sale:
        with self._lock:
            if key is not None:
                receipt = self._receipts.get(key)
                if receipt is not None:
                    return receipt.replay(key, quantity)
            try:
                sale: Sale = self._take(quantity)
            except SoldOut as sold_out:
                if key is not None:
                    self._receipts.put(key, Receipt.of(quantity, sold_out, self._clock()))
                raise
            if key is not None:
                self._receipts.put(key, Receipt.of(quantity, sale, self._sales[-1][1]))
            return sale

    def _take(self, quantity: int) -> Sale:
        """Read, check, decrement: the critical section the lock protects."""
        sold = self._sold  # read
        remaining = self._total - sold
        if quantity > remaining:
            raise SoldOut(quantity, remaining)
        if self._chore_s:
            time.sleep(self._chore_s)  # the lesson's slow chore, between read and write
        self._sold = sold + quantity  # write
        self._record(sold + 1)
        return Sale(range(sold + 1, sold + 1 + quantity), remaining - quantity)

    def _record(self, first: int) -> None:
        self._sales.append((first, self._clock()))

    def counts(self) -> Counts:
        with self._lock:
            return Counts(self._total, self._sold)

    def sold_at(self, serial: int) -> datetime | None:
        with self._lock:
            if not 1 <= serial <= self._sold:
                return None
            index = bisect.bisect_right(self._sales, (serial, float("inf"))) - 1
            if index < 0:
                return None
            return datetime.fromtimestamp(self._sales[index][1], UTC)

    def restock(self, tickets: int) -> Counts:
        with self._lock:
            self._total += tickets
            return Counts(self._total, self._sold)

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None
