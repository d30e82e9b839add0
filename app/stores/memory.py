"""The in-memory store: the lesson's shared counter, guarded by one ``threading.Lock``."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime

from app.inventory import (
    Counts,
    Hold,
    LiveHolds,
    Receipt,
    Sale,
    SoldOut,
    judge,
    new_hold_id,
)

__all__ = ["EXPIRE_BATCH", "MemoryStore", "ReceiptBook"]

#: Expired holds cleaned up at most this many at a time (each store call cleans some).
EXPIRE_BATCH = 100


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
        self._holds: dict[str, Hold] = {}
        self._live = LiveHolds()
        self._expired = 0

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
        remaining = self._total - sold - self._held()
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
            if self._live:
                self._clean_up(self._clock())
            return Counts(self._total, self._sold, self._held())

    def _held(self) -> int:
        return self._live.held(self._clock()) if self._live else 0

    # --- holds: the same lock, the same counters --------------------------------------

    def hold(self, quantity: int, ttl: float, key: str | None = None) -> Hold:
        with self._lock:
            now = self._clock()
            self._clean_up(now)
            if key is not None:
                receipt = self._receipts.get(key)
                if receipt is not None:
                    return receipt.replay_hold(key, quantity)
            remaining = self._total - self._sold - self._live.held(now)
            if quantity > remaining:
                sold_out = SoldOut(quantity, remaining)
                if key is not None:
                    self._receipts.put(key, Receipt.of(quantity, sold_out, now, "hold"))
                raise sold_out
            hold = Hold(new_hold_id(), quantity, "held", now + ttl)
            self._holds[hold.id] = hold
            self._live.add(hold.id, quantity, hold.expires_at)
            if key is not None:
                self._receipts.put(key, Receipt.of(quantity, hold, now))
            return hold

    def confirm(self, hold_id: str) -> Sale:
        with self._lock:
            now = self._clock()
            hold = self._holds.get(hold_id)
            settled = judge(hold, "confirm", now)
            self._clean_up(now)
            if settled is None:
                assert hold is not None
                self._live.remove(hold_id)
                first = self._sold + 1
                self._sold += hold.quantity
                self._record(first)
                settled = Hold(hold_id, hold.quantity, "confirmed", hold.expires_at,
                               range(first, first + hold.quantity))
                self._holds[hold_id] = settled
                return Sale(settled.serials, self._total - self._sold - self._live.held(now))
            return Sale(settled.serials, self._total - self._sold - self._live.held(now),
                        replayed=True)

    def release(self, hold_id: str) -> Hold:
        with self._lock:
            now = self._clock()
            hold = self._holds.get(hold_id)
            settled = judge(hold, "release", now)
            self._clean_up(now)
            if settled is None:
                assert hold is not None
                self._live.remove(hold_id)
                settled = self._holds[hold_id] = Hold(hold_id, hold.quantity, "released",
                                                      hold.expires_at)
            return settled

    def get_hold(self, hold_id: str) -> Hold | None:
        with self._lock:
            hold = self._holds.get(hold_id)
            return None if hold is None else hold.seen_at(self._clock())

    def holds_expired(self) -> int:
        with self._lock:
            return self._expired

    def _clean_up(self, now: float) -> None:
        """Mark a small batch of expired holds expired (they stopped counting already)."""
        for hold_id in self._live.due(now, EXPIRE_BATCH):
            self._live.remove(hold_id)
            self._holds[hold_id] = self._holds[hold_id].seen_at(now)
            self._expired += 1

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
            return Counts(self._total, self._sold, self._held())

    def check(self) -> None:
        return None

    def close(self) -> None:
        return None
