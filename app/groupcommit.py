"""Group commit: many orders, one transaction, one lock hold, one fsync.

Every durable store sells through this one mechanism. Orders from request threads (which
wait) and from parked requests (which give a callback, see app.parking) go into the
pending batch. One writer thread takes the whole pending batch (every order that arrived
while it was busy) and hands it to the store's backend, which commits it in one
transaction and sets each order's result; then the writer tells each order its outcome.
So while one commit waits on the disk or the network the next batch gathers, and no order
queues behind a commit that does not hold it. Each answer is given only after the commit
that holds its sale.

A backend may give several writers, each with a "commit this batch" of its own (PostgreSQL:
one connection each). While the store answers fast they take turns, one batch at a time, as
one writer would. When every recent batch took long to come back (a database across a
network: the round trip, not the work, is what takes the time), batches are pipelined:
while one is on its way, the next leaves as soon as ``BUSY_BATCH`` orders wait, on a free
writer, instead of waiting for the first to come back. The store orders the batches it
receives (PostgreSQL: by the stock row's lock), and every order still gets its answer from
its own commit.

A backend is one function, "commit this batch": it sets every order's result (sold, sold
out, a replayed receipt, or the error that order alone ends in) and returns (the seconds the
store itself spent on the batch, where it can tell, else None), or raises
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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from app.inventory import (
    CommitStats,
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
#: Pipelining (several writers): the store counts as far away when the quickest trip of
#: the last ``PIPELINE_WINDOW`` batches (a commit's time less what the store says it spent
#: on it, waiting for its lock included) took ``PIPELINE_AFTER_S`` or more; a store on
#: this machine is a fraction of a millisecond away. Then a free writer sends the next
#: batch once ``BUSY_BATCH`` orders wait: a batch worth a commit of its own.
PIPELINE_AFTER_S = 0.0015
PIPELINE_WINDOW = 64

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


Batch = list[Order]
#: A backend's "commit this batch": returns the seconds the store itself spent on it (its
#: lock and its work, not the trip there and back), or None when it cannot tell.
Commit: TypeAlias = Callable[[Batch], float | None]


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
    """The queue of orders and the writer threads that commit them in batches.

    Every order is told its outcome exactly once, within ``timeout`` seconds of being
    queued: a watchdog ends an order still queued then unsold, and tells the orders of a
    batch still committing then that their outcome is unknown (the commit goes on, and
    decides what was sold).
    """

    def __init__(self, commits: Sequence[Commit], name: str, *,
                 timeout: float, housekeeping: Callable[[int], None] | None = None) -> None:
        self._several = len(commits) > 1  # several writers: their trips are timed
        # Run by a writer (given its index) before each of its batches, one at a time.
        self._housekeeping = housekeeping
        self._housekeeping_lock = threading.Lock()
        self.timeout = timeout
        self._lock = threading.Lock()  # guards the queue, the batches and every order's told
        self._wake = threading.Condition(self._lock)  # free writers wait here for orders
        # A writer gathering a busy store's batch waits here, so that the BUSY_BATCH-th
        # order wakes it, not another writer.
        self._gathering = threading.Condition(self._lock)
        self._stop = threading.Condition(self._lock)  # the watchdog waits here
        self._pending: Batch = []
        self._batches: list[Batch] = []  # being committed, one per busy writer
        #: The trips of the last PIPELINE_WINDOW batches (several writers only).
        self._trips: deque[float] = deque(maxlen=PIPELINE_WINDOW)
        self._last = 0  # orders in the last batch taken
        self._pipelining = False  # whether the store is far away (see PIPELINE_AFTER_S)
        self._leader: int | None = None  # the writer waiting for orders, if one is
        self._spare = threading.Condition(self._lock)  # the other free writers wait here
        #: Batches taken, the orders in them, and those that left while another was on
        #: its way.
        self._taken = self._taken_orders = self._pipelined = 0
        self._closed = False
        self._writers = [
            threading.Thread(target=self._write_loop, args=(commit, lane),
                             name=name if lane == 0 else f"{name}-{lane + 1}", daemon=True)
            for lane, commit in enumerate(commits)]  # one writer thread each
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog",
                                          daemon=True)
        for writer in self._writers:
            writer.start()
        self._watchdog.start()

    @property
    def alive(self) -> bool:
        return all(writer.is_alive() for writer in self._writers)

    @property
    def busy(self) -> bool:
        """Whether a writer is committing a batch."""
        with self._lock:
            return bool(self._batches)

    def stats(self) -> CommitStats:
        """The batches taken so far, their orders, and how many were pipelined."""
        with self._lock:
            return CommitStats(self._taken, self._taken_orders, self._pipelined)

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
            waiting = len(self._pending)
            # Wake a writer only when one could send: with a batch on its way, only a
            # pipelining one once BUSY_BATCH wait (else the first writer back takes them).
            if self._batches:
                if waiting == BUSY_BATCH and self._pipelining:
                    self._wake.notify()
            elif waiting == 1:
                self._wake.notify()
            elif waiting == BUSY_BATCH:
                self._gathering.notify()

    def withdraw_all(self) -> int:
        """Stop taking orders; end every order not yet taken unsold. Returns how many.

        The batches the writers hold are committed and answered as usual.
        """
        with self._lock:
            self._closed = True
            withdrawn, self._pending = self._pending, []
            for order in withdrawn:
                order.told = True
            self._wake.notify_all()
        error = StoreUnavailable("the server is shutting down; nothing was sold")
        for order in withdrawn:
            _tell(order, error)
        return len(withdrawn)

    def close(self) -> None:
        """Commit what is pending, then stop the writers (waits up to the timeout)."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            self._gathering.notify_all()
            self._spare.notify_all()
        deadline = time.monotonic() + self.timeout
        for writer in self._writers:
            writer.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._stop.notify()
        self._watchdog.join(timeout=self.timeout)

    def _write_loop(self, commit: Commit, lane: int) -> None:
        """A writer: commit each batch it takes, in turn with the others.

        One free writer at a time, the leader, waits for orders and takes the next batch;
        the others wait as spares. A writer back from its batch leads again if no one
        does, so while batches go one at a time one writer (and one connection) does
        all the work; when pipelining, a leader that takes a batch hands the lead on.
        """
        while True:
            with self._lock:
                while self._leader is not None and not self._closed:
                    self._spare.wait()
                self._leader = lane
                self._gather()
                batch, self._pending = self._pending, []
                self._leader = None
                if batch:
                    self._taken += 1
                    self._taken_orders += len(batch)
                    self._pipelined += bool(self._batches)
                    self._batches.append(batch)
                    self._last = len(batch)
                    if self._pipelining:
                        self._spare.notify()  # the next leader
                closed = self._closed
            if not batch and closed:  # nothing left to commit
                return
            self._keep_house(lane)
            if not batch:  # idle: housekeeping only
                continue
            started = time.monotonic()
            spent = self._commit_batch(commit, batch)
            with self._lock:
                if self._several:
                    trips = self._trips
                    trips.append(time.monotonic() - started - (spent or 0.0))
                    self._pipelining = (len(trips) == PIPELINE_WINDOW
                                        and min(trips) >= PIPELINE_AFTER_S)
                untold = [order for order in batch if not order.told]
                for order in untold:
                    order.told = True
            for order in untold:
                _tell(order)
            with self._lock:
                # Only now, so that orders which came meanwhile wake no other writer: this
                # one takes them next, unless another leads; that one is told.
                self._batches.remove(batch)
                if self._leader is not None and self._pending:
                    self._wake.notify()

    def _keep_house(self, lane: int) -> None:
        """The store's housekeeping, unless another writer is doing it."""
        if self._housekeeping is None or not self._housekeeping_lock.acquire(blocking=False):
            return
        try:
            self._housekeeping(lane)
        except Exception:
            log.exception("store housekeeping failed")
        finally:
            self._housekeeping_lock.release()

    def _gather(self) -> None:
        """Wait, holding the lock, until this writer's next batch is to leave (or an idle
        timeout passes with nothing pending: time for housekeeping).

        With no batch on its way, it leaves at the first order, except that a busy store
        near by (the last batch held ``BUSY_BATCH`` orders or more) waits up to
        ``GATHER_S`` for ``BUSY_BATCH`` of them. With one on its way, the next waits for a
        writer to come back, unless batches are far away (see ``PIPELINE_AFTER_S``): then
        it leaves once ``BUSY_BATCH`` orders wait.
        """
        gathered = False
        while not self._closed:
            if self._batches:
                if self._pipelining and len(self._pending) >= BUSY_BATCH:
                    return
            elif self._pending:
                if (gathered or self._last < BUSY_BATCH or self._pipelining
                        or len(self._pending) >= BUSY_BATCH):
                    return
                gathered = True
                self._gathering.wait(GATHER_S)  # woken early by the BUSY_BATCH-th order
                continue
            if not self._wake.wait(IDLE_S):
                return

    @staticmethod
    def _commit_batch(commit: Commit, batch: Batch) -> float | None:
        """Commit ``batch``; every order gets a result, a failure included. Returns what
        the store says it spent on it."""
        try:
            return commit(batch)
        except (StoreUnavailable, OutcomeUnknown) as failure:
            error: Exception = failure
        except Exception as bug:  # answer every waiting request with it, then go on
            log.exception("committing a batch failed")
            error = bug
        for order in batch:
            order.result = error
        return None

    def _watch(self) -> None:
        """The watchdog: no order waits for its outcome longer than the timeout."""
        every = min(1.0, self.timeout / 4)
        while True:
            with self._lock:
                if self._closed and not any(w.is_alive() for w in self._writers):
                    return
                self._stop.wait(every)
                cutoff = time.monotonic() - self.timeout
                stale = 0
                while stale < len(self._pending) and self._pending[stale].queued <= cutoff:
                    stale += 1
                withdrawn, self._pending[:stale] = self._pending[:stale], []
                unknown = [order for batch in self._batches for order in batch
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

    def commit_stats(self) -> CommitStats:
        return self._orders.stats()

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
