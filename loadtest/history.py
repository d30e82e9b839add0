"""Keyed purchases: each carries an ``Idempotency-Key`` and is retried until it has an answer.

With ``--faults`` or ``--idempotent`` a booth buys through ``buy_until_answered``: a
purchase gets a new UUID key, and an attempt that got no definite answer (refused, reset,
timeout, 503 ``store_unavailable``, 504 ``outcome_unknown``, 409
``idempotency_key_in_flight``, any other 5xx) is sent again with the same key, after a short
backoff, until one answers or ``retry_for`` seconds have passed.  A definite answer is 200
(sold), 409 ``sold_out``, or another 4xx (the request itself was wrong).  Every attempt is
recorded, so that the checks can read the whole history afterwards and ``--history``
can write it out as JSON lines.  Nothing here knows about sockets: the booth hands in the
function that sends one attempt.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, NamedTuple

__all__ = [
    "ANSWERS",
    "Attempt",
    "Purchase",
    "Reply",
    "buy_until_answered",
    "judge",
    "write_history",
]

#: A purchase's final answer: sold, sold out, rejected (a 4xx: the request was wrong),
#: not sold (no definite answer, but no attempt can have sold), unknown (may have sold).
ANSWERS = ("sold", "sold_out", "rejected", "not_sold", "unknown")

#: Backoff between attempts of one purchase: doubles from the first to the last, in seconds.
BACKOFF_FIRST_S = 0.01
BACKOFF_LAST_S = 0.2

#: 4xx answers that are not definite: the same request may succeed when sent again.
_RETRYABLE_4XX = frozenset({408, 429})
_IN_FLIGHT = "409 idempotency_key_in_flight"
#: Attempts that certainly sold nothing, though they answered nothing definite.
_SOLD_NOTHING = frozenset({"refused", "connect", "503 store_unavailable"})


class Reply(NamedTuple):
    """What one attempt got: an HTTP status and body, or the kind of failure (``refused``,
    ``timeout``, ``reset``, ``other``) and whether the request may have reached the server."""

    status: int | None
    body: bytes = b""
    failure: str = ""
    maybe_sent: bool = True


@dataclass(slots=True)
class Attempt:
    """One request of a purchase; times in seconds since the run started."""

    start: float
    end: float
    #: Which service (0-based; 1-based in the report and the history file).
    instance: int
    #: ``200``, ``STATUS CODE`` for an error answer (e.g. ``503 store_unavailable``), or the
    #: failure's kind (``refused``, ``connect``, ``timeout``, ``reset``, ``other``).
    outcome: str
    status: int | None = None
    serials: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"start": round(self.start, 6), "end": round(self.end, 6),
                                  "instance": self.instance + 1, "outcome": self.outcome}
        if self.serials:
            out["serials"] = list(self.serials)
        return out


@dataclass(slots=True)
class Purchase:
    """One purchase and every attempt it took; ``answer`` is one of ANSWERS."""

    key: str
    quantity: int
    booth: int
    attempts: list[Attempt] = field(default_factory=list)
    answer: str = "unknown"
    serials: tuple[int, ...] = ()

    @property
    def answered_at(self) -> float:
        return self.attempts[-1].end if self.attempts else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "quantity": self.quantity, "booth": self.booth,
                "answer": self.answer, "serials": list(self.serials),
                "attempts": [a.as_dict() for a in self.attempts]}


def _error_code(body: bytes) -> str:
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    return code if isinstance(code, str) else ""


def judge(reply: Reply) -> tuple[str, str | None, tuple[int, ...]]:
    """An attempt's outcome label, its final answer when it is definite (else None), and
    the serials of a sale."""
    status = reply.status
    if status is None:
        kind = reply.failure if reply.maybe_sent or reply.failure == "refused" else "connect"
        return kind, None, ()
    if status == 200:
        try:
            serials = tuple(int(t["serial"]) for t in json.loads(reply.body)["tickets"])
        except (ValueError, KeyError, TypeError):
            return "200 unreadable", None, ()  # it may have sold: a replay tells the serials
        return "200", "sold", serials
    code = _error_code(reply.body)
    outcome = f"{status} {code}" if code else str(status)
    if outcome == "409 sold_out":
        return outcome, "sold_out", ()
    if 400 <= status < 500 and status not in _RETRYABLE_4XX and outcome != _IN_FLIGHT:
        return outcome, "rejected", ()
    return outcome, None, ()


def buy_until_answered(send: Callable[[str], Reply], quantity: int, *, booth: int,
                       instance: int, origin: float, retry_for: float,
                       stop: threading.Event) -> Purchase:
    """One purchase under a new key: ``send(key)`` until a definite answer, at most
    ``retry_for`` seconds, or until ``stop`` is set (Ctrl-C)."""
    purchase = Purchase(key=str(uuid.uuid4()), quantity=quantity, booth=booth)
    perf = time.perf_counter
    give_up_at = perf() + retry_for
    backoff = BACKOFF_FIRST_S
    while True:
        start = perf()
        reply = send(purchase.key)
        end = perf()
        outcome, answer, serials = judge(reply)
        purchase.attempts.append(Attempt(start - origin, end - origin, instance, outcome,
                                         reply.status, serials))
        if answer is not None:
            purchase.answer, purchase.serials = answer, serials
            return purchase
        if stop.is_set() or end + backoff > give_up_at or stop.wait(backoff):
            sold_nothing = all(a.outcome in _SOLD_NOTHING for a in purchase.attempts)
            purchase.answer = "not_sold" if sold_nothing else "unknown"
            return purchase
        backoff = min(backoff * 2, BACKOFF_LAST_S)


def write_history(purchases: Iterable[Purchase], stream: IO[str]) -> int:
    """Write one JSON object per purchase, in the order they were answered; the count."""
    count = 0
    for purchase in sorted(purchases, key=lambda p: p.answered_at):
        stream.write(json.dumps(purchase.as_dict(), separators=(",", ":")) + "\n")
        count += 1
    return count
