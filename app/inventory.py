"""The domain: a fixed stock of numbered tickets, sold all or nothing, never twice.

Nothing here knows about HTTP or SQL. Stores (``app.stores``) keep the stock; the
:class:`Booth` in front of them enforces the per-request rules and guards idempotency keys
that are still being processed.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NamedTuple, Protocol, TypeAlias, runtime_checkable

__all__ = [
    "Booth",
    "CommitStats",
    "Counts",
    "DeferringStore",
    "Hold",
    "HoldConfirmed",
    "HoldExpired",
    "HoldNotFound",
    "HoldReleased",
    "HoldState",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReuse",
    "InvalidHoldTtl",
    "InvalidQuantity",
    "LiveHolds",
    "Outcome",
    "OutcomeUnknown",
    "Receipt",
    "Sale",
    "SoldOut",
    "Store",
    "StoreUnavailable",
    "TicketboothError",
    "judge",
    "new_hold_id",
    "valid_hold_id",
]


@dataclass(frozen=True, slots=True)
class Sale:
    """Tickets handed to one buyer: consecutive serials, and what was left afterwards."""

    serials: range
    remaining: int
    replayed: bool = False


class CommitStats(NamedTuple):
    """What a group-committing store has committed: its batches (every one handed to the
    database, failed ones too), the orders in them, and the batches that left while another
    was on its way (pipelined: the database is far away)."""

    batches: int
    orders: int
    pipelined: int


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    sold: int
    held: int = 0  # tickets in live holds (not confirmed, released or expired)

    @property
    def remaining(self) -> int:
        """What a buy or a new hold can still take."""
        return self.total - self.sold - self.held


HoldState: TypeAlias = Literal["held", "confirmed", "released", "expired"]

#: Hold ids: 128 random bits, URL-safe base64 without padding (22 characters).
_HOLD_ID = re.compile(r"[A-Za-z0-9_-]{22}")


def new_hold_id() -> str:
    return secrets.token_urlsafe(16)


def valid_hold_id(text: str) -> bool:
    return _HOLD_ID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Hold:
    """Tickets set aside for one buyer until ``expires_at`` (seconds since the epoch, by the
    store's clock), then confirmed (sold, with ``serials``), released or expired."""

    id: str
    quantity: int
    state: HoldState
    expires_at: float
    serials: range = range(0)
    replayed: bool = False

    def seen_at(self, now: float) -> Hold:
        """The hold as it stands at ``now``: a live hold past its expiry is expired, whether
        or not the store has cleaned it up yet."""
        if self.state == "held" and now >= self.expires_at:
            return Hold(self.id, self.quantity, "expired", self.expires_at)
        return self


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


class InvalidHoldTtl(TicketboothError):
    """A hold's time to live outside 1..max."""


class HoldNotFound(TicketboothError):
    """No hold has this id (or the id is malformed)."""

    def __init__(self) -> None:
        super().__init__("no hold has this id")


class HoldExpired(TicketboothError):
    """The hold ran out before it was confirmed; its tickets went back to the stock."""

    def __init__(self) -> None:
        super().__init__("the hold has expired; its tickets went back to the stock")


class HoldReleased(TicketboothError):
    """The hold was released; it can no longer be confirmed."""

    def __init__(self) -> None:
        super().__init__("the hold was released; its tickets went back to the stock")


class HoldConfirmed(TicketboothError):
    """The hold was confirmed; its tickets are sold and cannot be given back."""

    def __init__(self) -> None:
        super().__init__("the hold is confirmed; its tickets are sold")


class IdempotencyKeyReuse(TicketboothError):
    """The key was first used for a different request."""

    def __init__(self, key: str, first: str, now: str) -> None:
        super().__init__(f"Idempotency-Key was first used to {first}, not to {now}")
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

    def hold(self, quantity: int, ttl: float, key: str | None = None) -> Hold:
        """Set ``quantity`` tickets aside for ``ttl`` seconds, as one atomic step.

        Raises :class:`SoldOut` (nothing held) when fewer remain. A ``key`` works as with
        :meth:`sell`, in the same namespace: a key first used to buy raises
        :class:`IdempotencyKeyReuse` here, and the other way round.
        """
        ...

    def confirm(self, hold_id: str) -> Sale:
        """Sell a live hold's tickets (consecutive new serials); again for a confirmed hold
        (``replayed``). Raises HoldExpired, HoldReleased or HoldNotFound."""
        ...

    def release(self, hold_id: str) -> Hold:
        """Give a live hold's tickets back; a released or expired hold stays as it is.
        Raises HoldConfirmed or HoldNotFound."""
        ...

    def get_hold(self, hold_id: str) -> Hold | None:
        """The hold as it stands now (expired once its time is up), or None."""
        ...

    def holds_expired(self) -> int:
        """How many holds this store object has cleaned up as expired (each hold is cleaned
        up once, by one instance)."""
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

    def commit_stats(self) -> CommitStats:
        """What this store object has committed so far (its group commit's batches)."""
        ...


class Receipt(NamedTuple):
    """The first outcome for an idempotency key, kept so a retry gets the same answer.

    A named tuple: immutable like the frozen dataclasses here, and made in a third of the
    time (one for every keyed order)."""

    quantity: int
    serials: range  # empty when the first answer was sold out
    remaining: int
    created: float  # seconds since the epoch
    #: What the key was first used for: a buy, or a hold (then its id and expiry, unless
    #: the hold was refused as sold out). Keys form one namespace across both.
    kind: Literal["buy", "hold"] = "buy"
    hold_id: str | None = None
    expires_at: float = 0.0

    @classmethod
    def of(cls, quantity: int, outcome: Sale | Hold | SoldOut, created: float,
           kind: Literal["buy", "hold"] = "buy") -> Receipt:
        if isinstance(outcome, Hold):
            return cls(quantity, range(0), 0, created, "hold", outcome.id, outcome.expires_at)
        serials = outcome.serials if isinstance(outcome, Sale) else range(0)
        return cls(quantity, serials, outcome.remaining, created, kind)

    def expired(self, now: float, ttl: float) -> bool:
        """Whether the key is forgotten: first used ``ttl`` seconds or more before ``now``."""
        return self.created <= now - ttl

    def replay(self, key: str, quantity: int) -> Sale:
        """The stored answer again, for a retry of a buy with the same key."""
        self._same(key, "buy", quantity)
        if not self.serials:
            raise SoldOut(quantity, self.remaining, replayed=True)
        return Sale(self.serials, self.remaining, replayed=True)

    def replay_hold(self, key: str, quantity: int) -> Hold:
        """The stored answer again, for a retry of a hold with the same key: the hold as
        it was created (its state now is at ``GET /holds/ID``)."""
        self._same(key, "hold", quantity)
        if self.hold_id is None:
            raise SoldOut(quantity, self.remaining, replayed=True)
        return Hold(self.hold_id, quantity, "held", self.expires_at, replayed=True)

    def _same(self, key: str, kind: str, quantity: int) -> None:
        if kind != self.kind or quantity != self.quantity:
            verb = "buy" if self.kind == "buy" else "hold"
            raise IdempotencyKeyReuse(key, f"{verb} {self.quantity} ticket(s)",
                                      f"{'buy' if kind == 'buy' else 'hold'} {quantity}")


HoldAction: TypeAlias = Literal["confirm", "release"]


def judge(hold: Hold | None, action: HoldAction, now: float) -> Hold | None:
    """The state machine of a hold, for stores that run it in Python.

    None when ``action`` is to change the live hold (confirm it, or release it); the hold
    as it stands, ``replayed``, when that is the answer (a confirm again, a release of a
    hold already released or expired); else raises the error the action ends in.
    """
    if hold is None:
        raise HoldNotFound()
    seen = hold.seen_at(now)
    if seen.state == "held":
        return None
    seen = dataclasses.replace(seen, replayed=True)
    if action == "confirm":
        if seen.state == "confirmed":
            return seen
        raise HoldExpired() if seen.state == "expired" else HoldReleased()
    if seen.state == "confirmed":
        raise HoldConfirmed()
    return seen


class LiveHolds:
    """The holds that still count against the stock, by expiry, so that the tickets held
    at any instant are exact even before expired holds are cleaned up. Not thread-safe:
    its store guards it."""

    def __init__(self) -> None:
        self._by_expiry: list[tuple[float, str, int]] = []  # (expires_at, id, quantity)
        self._quantity = 0
        self._expiry: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._by_expiry)

    def __contains__(self, hold_id: str) -> bool:
        return hold_id in self._expiry

    def add(self, hold_id: str, quantity: int, expires_at: float) -> None:
        bisect.insort(self._by_expiry, (expires_at, hold_id, quantity))
        self._expiry[hold_id] = expires_at
        self._quantity += quantity

    def remove(self, hold_id: str) -> None:
        expires_at = self._expiry.pop(hold_id, None)
        if expires_at is None:
            return
        index = bisect.bisect_left(self._by_expiry, (expires_at, hold_id))
        self._quantity -= self._by_expiry.pop(index)[2]

    def held(self, now: float) -> int:
        """Tickets held at ``now``: expired holds not cleaned up yet do not count."""
        held = self._quantity
        for expires_at, _, quantity in self._by_expiry:
            if expires_at > now:
                break
            held -= quantity
        return held

    def due(self, now: float, limit: int) -> list[str]:
        """Up to ``limit`` ids of holds expired at ``now``, oldest expiry first."""
        due = []
        for expires_at, hold_id, _ in self._by_expiry[:limit]:
            if expires_at > now:
                break
            due.append(hold_id)
        return due


class Booth:
    """The ticket window: per-request rules in front of a store."""

    def __init__(self, store: Store, max_per_request: int, *, hold_ttl: int = 600,
                 max_hold_ttl: int = 3600) -> None:
        self.store = store
        self.max_per_request = max_per_request
        self.hold_ttl = hold_ttl
        self.max_hold_ttl = max_hold_ttl
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()
        self._deferring = store if isinstance(store, DeferringStore) else None

    def buy(self, quantity: int, key: str | None = None) -> Sale:
        self._check(quantity)
        if key is None:
            return self.store.sell(quantity)
        self._take(key)  # the key stays claimed until the outcome is known
        try:
            return self.store.sell(quantity, key)
        finally:
            self._release(key)

    def hold(self, quantity: int, ttl: int | None = None, key: str | None = None) -> Hold:
        self._check(quantity)
        if ttl is None:
            ttl = self.hold_ttl
        if not 1 <= ttl <= self.max_hold_ttl:
            raise InvalidHoldTtl(f"ttl_s must be between 1 and {self.max_hold_ttl}, got {ttl}")
        if key is None:
            return self.store.hold(quantity, ttl)
        self._take(key)
        try:
            return self.store.hold(quantity, ttl, key)
        finally:
            self._release(key)

    def confirm(self, hold_id: str) -> Sale:
        return self.store.confirm(self._hold_id(hold_id))

    def release(self, hold_id: str) -> Hold:
        return self.store.release(self._hold_id(hold_id))

    def get_hold(self, hold_id: str) -> Hold:
        hold = self.store.get_hold(self._hold_id(hold_id))
        if hold is None:
            raise HoldNotFound()
        return hold

    @staticmethod
    def _hold_id(hold_id: str) -> str:
        if not valid_hold_id(hold_id):
            raise HoldNotFound()
        return hold_id

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

    def _take(self, key: str) -> None:
        with self._in_flight_lock:
            if key in self._in_flight:
                raise IdempotencyKeyInFlight(key)
            self._in_flight.add(key)

    def _release(self, key: str) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(key)
