"""The domain: a fixed stock of numbered tickets, sold all or nothing, never twice.

Nothing here knows about HTTP or SQL. Stores (``app.stores``) keep the stock; the
:class:`Booth` in front of them enforces the per-request rules and guards idempotency keys
that are still being processed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeAlias, runtime_checkable

__all__ = [
    "Booth",
    "Counts",
    "DeferringStore",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReuse",
    "InvalidQuantity",
    "Outcome",
    "OutcomeUnknown",
    "Receipt",
    "Sale",
    "SoldOut",
    "Store",
    "StoreUnavailable",
    "TicketboothError",
]


@dataclass(frozen=True, slots=True)
class Sale:
    """Tickets handed to one buyer: consecutive serials, and what was left afterwards."""

    serials: range
    remaining: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    sold: int

    @property
    def remaining(self) -> int:
        return self.total - self.sold


class TicketboothError(Exception):
    """Base of every error the domain reports to a buyer."""


class SoldOut(TicketboothError):
    """Fewer tickets remain than were asked for; nothing was sold."""

    def __init__(self, requested: int, remaining: int, replayed: bool = False) -> None:
        super().__init__(f"asked for {requested} ticket(s) but only {remaining} remain")
        self.requested = requested
        self.remaining = remaining
        self.replayed = replayed


class InvalidQuantity(TicketboothError):
    """A quantity outside 1..max per request."""


class IdempotencyKeyReuse(TicketboothError):
    """The key was first used for a different request."""

    def __init__(self, key: str, first_quantity: int, quantity: int) -> None:
        super().__init__(f"Idempotency-Key was first used to buy {first_quantity} ticket(s), "
                         f"not {quantity}")
        self.key = key


class IdempotencyKeyInFlight(TicketboothError):
    """A request with this key is still being processed."""

    def __init__(self, key: str) -> None:
        super().__init__("a request with this Idempotency-Key is still being processed; "
                         "retry later")
        self.key = key


class StoreUnavailable(TicketboothError):
    """The store cannot answer now (database down or failing); nothing was sold."""


class OutcomeUnknown(TicketboothError):
    """The sale may or may not have happened (the store was cut off while it committed);
    a retry with the same idempotency key learns which."""


class Store(Protocol):
    """Where the stock lives. Every backend passes the same test suite."""

    def sell(self, quantity: int, key: str | None = None) -> Sale:
        """Sell ``quantity`` tickets as one atomic step.

        Raises :class:`SoldOut` (nothing sold) when fewer remain. With a ``key``, the
        outcome (sale or sold-out) is stored with the sale; a later call with the same key
        and quantity returns it again with ``replayed=True`` and sells nothing, a different
        quantity raises :class:`IdempotencyKeyReuse`.
        """
        ...

    def counts(self) -> Counts: ...

    def sold_at(self, serial: int) -> datetime | None:
        """When ticket ``serial`` was sold, or None when it is not sold (or out of range)."""
        ...

    def restock(self, tickets: int) -> Counts:
        """Add ``tickets`` new serials after the last one, atomically with sales."""
        ...

    def check(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot serve."""
        ...

    def close(self) -> None: ...


# What a deferred sale ends in: the sale, or the error a direct call would have raised.
Outcome: TypeAlias = Sale | Exception


@runtime_checkable
class DeferringStore(Store, Protocol):
    """A store whose sales wait on something slow (a disk) and can be waited for elsewhere."""

    def sell_later(self, quantity: int, key: str | None,
                   done: Callable[[Outcome], None]) -> None:
        """Start selling ``quantity`` tickets; return at once.

        ``done`` is called exactly once, from another thread, with what :meth:`Store.sell`
        would have returned or raised, only after the sale is as durable as ``sell``
        makes it. Raises :class:`StoreUnavailable` at once when the store is closed.
        """
        ...

    def withdraw_pending(self) -> int:
        """Stop taking orders and end those not yet being committed unsold (their ``done``
        or waiting caller gets :class:`StoreUnavailable`); return how many. For a shutdown
        whose grace period is over: what is being committed is still committed."""
        ...


@dataclass(frozen=True, slots=True)
class Receipt:
    """The first outcome for an idempotency key, kept so a retry gets the same answer."""

    quantity: int
    serials: range  # empty when the first answer was sold out
    remaining: int
    created: float  # seconds since the epoch

    @classmethod
    def of(cls, quantity: int, outcome: Sale | SoldOut, created: float) -> Receipt:
        serials = outcome.serials if isinstance(outcome, Sale) else range(0)
        return cls(quantity, serials, outcome.remaining, created)

    def expired(self, now: float, ttl: float) -> bool:
        """Whether the key is forgotten: first used ``ttl`` seconds or more before ``now``."""
        return self.created <= now - ttl

    def replay(self, key: str, quantity: int) -> Sale:
        """The stored answer again, for a retry with the same key."""
        if quantity != self.quantity:
            raise IdempotencyKeyReuse(key, self.quantity, quantity)
        if not self.serials:
            raise SoldOut(quantity, self.remaining, replayed=True)
        return Sale(self.serials, self.remaining, replayed=True)


class Booth:
    """The ticket window: per-request rules in front of a store."""

    def __init__(self, store: Store, max_per_request: int) -> None:
        self.store = store
        self.max_per_request = max_per_request
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()
        self._deferring = store if isinstance(store, DeferringStore) else None

    def buy(self, quantity: int, key: str | None = None) -> Sale:
        self._check(quantity)
        if key is None:
            return self.store.sell(quantity)
        with self._claim(key):
            return self.store.sell(quantity, key)

    @property
    def can_defer(self) -> bool:
        """Whether :meth:`buy_later` can hand sales to the store without waiting."""
        return self._deferring is not None

    def buy_later(self, quantity: int, key: str | None,
                  done: Callable[[Outcome], None]) -> None:
        """:meth:`buy`, whose outcome goes to ``done`` (see DeferringStore).

        A key stays claimed until its outcome is known, as with :meth:`buy`: raises
        :class:`IdempotencyKeyInFlight` at once when it is claimed already.
        """
        self._check(quantity)
        assert self._deferring is not None, "check can_defer first"
        if key is None:
            self._deferring.sell_later(quantity, None, done)
            return
        self._take(key)

        def release_then_done(outcome: Outcome) -> None:
            self._release(key)
            done(outcome)

        try:
            self._deferring.sell_later(quantity, key, release_then_done)
        except BaseException:
            self._release(key)
            raise

    def withdraw_pending(self) -> int:
        """Orders not yet being committed end unsold (a shutdown's grace period is over)."""
        return self._deferring.withdraw_pending() if self._deferring is not None else 0

    def _check(self, quantity: int) -> None:
        if not 1 <= quantity <= self.max_per_request:
            raise InvalidQuantity(
                f"quantity must be between 1 and {self.max_per_request}, got {quantity}")

    @contextmanager
    def _claim(self, key: str) -> Iterator[None]:
        self._take(key)
        try:
            yield
        finally:
            self._release(key)

    def _take(self, key: str) -> None:
        with self._in_flight_lock:
            if key in self._in_flight:
                raise IdempotencyKeyInFlight(key)
            self._in_flight.add(key)

    def _release(self, key: str) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(key)
