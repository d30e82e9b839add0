"""Parked requests: a sale waiting on the disk does not hold a worker thread.

waitress answers each request on one of a fixed pool of worker threads (``--threads``). A
durable sale waits for the fsync of its group commit; were its worker to wait with it, a
batch could hold at most ``--threads`` orders and the workers would sit idle while the disk
works. So a ``POST /buy`` on a store that can defer
(:class:`~app.inventory.DeferringStore`) is *parked*: where waitress would queue the request
for a worker (on the event loop's thread, as soon as the request is read), the server
offers it to the app's hook (:meth:`app.hotpath.HotPath.park`) instead, which reads the
order and hands it to the store with a callback; no worker takes a turn for it. The request
stays first in its connection's line. When the commit is done, the callback queues the
connection with waitress's workers, and a worker runs the request as usual, through the
whole WSGI app, which finds the outcome waiting instead of selling. Every answer is still
given only after the commit that holds its sale. A keyed request's key stays claimed from
its parking until its outcome is known (a retry meanwhile gets 409, as an unparked one).

This module is the contract between the two: the app offers its hook under
:data:`PARK_EXTENSION`; the server gives the hook a way to make the request's
:class:`Parking` (the hook makes it only for a request it parks), and puts it in the WSGI
environ of the run that answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.inventory import Outcome, Sale

__all__ = ["ENVIRON_KEY", "PARK_EXTENSION", "WITHDRAW_EXTENSION", "Parking"]

# Where the app offers its parking hook to the server: a key of the Flask app's extensions.
PARK_EXTENSION = "ticketbooth.park"
# Where the app offers the server a function that ends the orders its store has queued and
# not yet started on, unsold (their requests are answered 503); the server calls it once
# a shutdown's grace period is over. It returns how many it ended.
WITHDRAW_EXTENSION = "ticketbooth.withdraw"
# The WSGI environ key under which a parked request's run that answers finds its Parking.
ENVIRON_KEY = "ticketbooth.parking"


class Parking:
    """One request's parking ticket: when it started, and its outcome once there is one."""

    __slots__ = ("_resume", "outcome", "started")

    def __init__(self, resume: Callable[[], None]) -> None:
        self._resume = resume
        self.started = time.perf_counter()  # when it was parked: its timing spans both runs
        self.outcome: Outcome | None = None

    @property
    def waiting(self) -> bool:
        """Whether the request still waits for its outcome."""
        return self.outcome is None

    def done(self, outcome: Outcome) -> None:
        """The store's callback: keep the outcome, queue the request to run again."""
        self.outcome = outcome
        self._resume()

    def result(self) -> Sale:
        """The resumed request's sale, or the error the sale ended in."""
        outcome = self.outcome
        assert outcome is not None, "the request was not parked"
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
