"""Group commit: many orders, one transaction, one lock hold, one fsync.

Every durable store sells through this one mechanism. Orders from request threads (which
wait) and from parked requests (which give a callback, see app.parking) go into the
pending batch. One writer thread takes the whole pending batch (every order that arrived
while it was busy) and hands it to the store's backend, which commits it in one
transaction and sets each order's result; then the writer tells each order its outcome.
So while one commit waits on the disk or the network the next batch gathers, and no order
queues behind a commit that does not hold it. Each answer is given only after the commit
that holds its sale.

A backend is one function, "commit this batch": it sets every order's result (sold, sold
out, a replayed receipt, or the error that order alone ends in) and returns, or raises
:class:`~app.inventory.StoreUnavailable` when the batch certainly did not commit, or
:class:`~app.inventory.OutcomeUnknown` when its fate cannot be known; every order of the
batch then ends in that error.

An order is in the store's hands from the moment the writer takes it: before that it can
be withdrawn (a request that waited too long, a shutdown whose grace period ran out), and
it then ends unsold (503 ``store_unavailable``); after that only the commit decides, and a
request that stops waiting for it answers 504 ``outcome_unknown``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from app.inventory import (
    Counts,
    Hold,
    Outcome,
    OutcomeUnknown,
    Sale,
    StoreUnavailable,
    new_hold_id,
)

__all__ = ["Batch", "GroupCommit", "GroupCommitted", "Order", "OrderKind"]

log = logging.getLogger("ticketbooth")

#: A commit delay, like PostgreSQL's commit_delay and commit_siblings: when the last batch
#: held ``BUSY_BATCH`` orders or more (the store is busy) and fewer are pending, the writer
#: waits up to ``GATHER_S`` for more before it commits, and starts at once when the
#: ``BUSY_BATCH``-th arrives: fewer commits per sale under load; a store that is not busy
#: never waits.
BUSY_BATCH = 16
GATHER_S = 0.0005
#: With no orders coming, the writer still runs the store's housekeeping (expiring holds,
#: forgetting old keys) this often.
IDLE_S = 0.5

OrderKind: TypeAlias = Literal["sell", "restock", "hold", "confirm", "release"]


@dataclass(slots=True, eq=False)  # eq=False: orders are compared by identity
class Order:
    """One request's order: a sale of ``quantity`` (with an idempotency ``key``), a
    restock of ``quantity`` tickets, a new hold of ``quantity`` for ``ttl`` seconds (with
    its new ``hold_id`` and maybe a ``key``), or the confirm or release of hold ``hold_id``.
    """

    quantity: int
    key: str | None = None
    kind: OrderKind = "sell"
    hold_id: str | None = None
    ttl: float = 0.0
    #: Set by the backend: the sale (a confirm's too), the counts after a restock, the
    #: hold (new or released), or the order's error.
    result: Sale | Counts | Hold | Exception | None = None
    #: A parked request's callback, told the outcome; None when a thread waits on ``done``
    #: (held until then: the cheapest wake-up there is, one futex, shared with no one).
    callback: Callable[[Outcome], None] | None = None
    done: threading.Lock | None = None
    #: When it was queued (time.monotonic), and whether it has been told its outcome.
    queued: float = field(default_factory=time.monotonic)
    told: bool = False


#: A backend's "commit this batch".
Batch = list[Order]


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


def _tell(order: Order, result: Sale | Counts | Hold | Exception | None = None) -> None:
    """Give an order its outcome (``result``, else what the backend set); once only, which
    the caller makes sure of. A caller's bug must not stop the writer."""
    if result is not None:
        order.result = result
    if order.callback is None:
        assert order.done is not None
        order.done.release()
        return
    outcome = order.result
    assert isinstance(outcome, Sale | Exception)
    try:
        order.callback(outcome)
    except Exception:
        log.exception("a deferred sale's callback failed")


class GroupCommit:
    """The queue of orders and the writer thread that commits them in batches.

    Every order is told its outcome exactly once, within ``timeout`` seconds of being
    queued: a watchdog ends an order still queued then unsold, and tells the orders of a
    batch still committing then that their outcome is unknown (the commit goes on, and
    decides what was sold).
    """

    def __init__(self, commit: Callable[[Batch], None], name: str, *, timeout: float,
                 housekeeping: Callable[[], None] | None = None) -> None:
        self._commit = commit
        self._housekeeping = housekeeping  # run by the writer before each batch
        self.timeout = timeout
        self._lock = threading.Lock()  # guards the queue, the batch and every order's told
        self._wake = threading.Condition(self._lock)  # the writer waits here for orders
        self._stop = threading.Condition(self._lock)  # the watchdog waits here
        self._pending: Batch = []
        self._batch: Batch = []  # being committed
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name=name, daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog",
                                          daemon=True)
        self._writer.start()
        self._watchdog.start()

    @property
    def alive(self) -> bool:
        return self._writer.is_alive()

    @property
    def busy(self) -> bool:
        """Whether the writer is committing a batch."""
        with self._lock:
            return bool(self._batch)

    @property
    def pending(self) -> int:
        """Orders queued and not yet taken by the writer."""
        with self._lock:
            return len(self._pending)

    def submit(self, order: Order) -> Sale | Counts | Hold:
        """Queue ``order`` and wait for its outcome; raise the error it ended in."""
        order.done = _held_lock()
        self.enqueue(order)
        order.done.acquire()  # the watchdog makes sure this ends within the timeout
        if isinstance(order.result, Exception):
            raise order.result
        assert order.result is not None
        return order.result

    def enqueue(self, order: Order) -> None:
        """Queue ``order``; its callback (or its ``done`` lock) is told the outcome."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed; nothing was sold")
            self._pending.append(order)
            if len(self._pending) in (1, BUSY_BATCH):
                self._wake.notify()

    def withdraw_all(self) -> int:
        """Stop taking orders; end every order not yet taken unsold. Returns how many.

        The batch the writer holds is committed and answered as usual.
        """
        with self._lock:
            self._closed = True
            withdrawn, self._pending = self._pending, []
            for order in withdrawn:
                order.told = True
            self._wake.notify()
        error = StoreUnavailable("the server is shutting down; nothing was sold")
        for order in withdrawn:
            _tell(order, error)
        return len(withdrawn)

    def close(self) -> None:
        """Commit what is pending, then stop the writer (waits up to the timeout)."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._writer.join(timeout=self.timeout)
        with self._lock:
            self._stop.notify()
        self._watchdog.join(timeout=self.timeout)

    def _write_loop(self) -> None:
        """The writer: commit each pending batch as soon as the previous one is done."""
        last = 0  # orders in the last batch
        while True:
            with self._lock:
                if not self._pending and not self._closed:
                    self._wake.wait(IDLE_S)
                if last >= BUSY_BATCH and len(self._pending) < BUSY_BATCH and not self._closed:
                    self._wake.wait(GATHER_S)  # woken early by the BUSY_BATCH-th order
                batch, self._pending = self._pending, []
                self._batch = batch
                closed = self._closed
            last = len(batch)
            if not batch and closed:  # nothing left to commit
                return
            if self._housekeeping is not None:
                try:
                    self._housekeeping()
                except Exception:
                    log.exception("store housekeeping failed")
            if not batch:  # idle: housekeeping only
                continue
            self._commit_batch(batch)
            with self._lock:
                self._batch = []
                untold = [order for order in batch if not order.told]
                for order in untold:
                    order.told = True
            for order in untold:
                _tell(order)

    def _commit_batch(self, batch: Batch) -> None:
        """Commit ``batch``; every order gets a result, a failure included."""
        try:
            self._commit(batch)
            return
        except (StoreUnavailable, OutcomeUnknown) as failure:
            error: Exception = failure
        except Exception as bug:  # answer every waiting request with it, then go on
            log.exception("committing a batch failed")
            error = bug
        for order in batch:
            order.result = error

    def _watch(self) -> None:
        """The watchdog: no order waits for its outcome longer than the timeout."""
        every = min(1.0, self.timeout / 4)
        while True:
            with self._lock:
                if self._closed and not self._writer.is_alive():
                    return
                self._stop.wait(every)
                cutoff = time.monotonic() - self.timeout
                stale = 0
                while stale < len(self._pending) and self._pending[stale].queued <= cutoff:
                    stale += 1
                withdrawn, self._pending[:stale] = self._pending[:stale], []
                unknown = [order for order in self._batch
                           if not order.told and order.queued <= cutoff]
                for order in (*withdrawn, *unknown):
                    order.told = True
            if withdrawn:
                log.warning("%d order(s) waited %.1f s without being taken; not sold",
                            len(withdrawn), self.timeout)
                error = StoreUnavailable("the store did not take the order in time; nothing "
                                         "was sold")
                for order in withdrawn:
                    _tell(order, error)
            if unknown:
                log.warning("a batch of %d order(s) has been committing for over %.1f s",
                            len(unknown), self.timeout)
                unsure = OutcomeUnknown("the store did not finish the sale in time; it may "
                                        "still happen: retry with the same Idempotency-Key "
                                        "to learn its outcome")
                for order in unknown:
                    _tell(order, unsure)


class GroupCommitted:
    """What a store that sells through a :class:`GroupCommit` (``self._orders``) answers."""

    _orders: GroupCommit

    def sell(self, quantity: int, key: str | None = None) -> Sale:
        result = self._orders.submit(Order(quantity, key))
        assert isinstance(result, Sale)
        return result

    def sell_later(self, quantity: int, key: str | None,
                   done: Callable[[Outcome], None]) -> None:
        self._orders.enqueue(Order(quantity, key, callback=done))

    def withdraw_pending(self) -> int:
        return self._orders.withdraw_all()

    def hold(self, quantity: int, ttl: float, key: str | None = None) -> Hold:
        result = self._orders.submit(Order(quantity, key, "hold", new_hold_id(), ttl))
        assert isinstance(result, Hold)
        return result

    def confirm(self, hold_id: str) -> Sale:
        result = self._orders.submit(Order(0, None, "confirm", hold_id))
        assert isinstance(result, Sale)
        return result

    def release(self, hold_id: str) -> Hold:
        result = self._orders.submit(Order(0, None, "release", hold_id))
        assert isinstance(result, Hold)
        return result
