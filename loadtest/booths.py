"""The booths: threads that buy tickets over HTTP and record what happened.

Each booth owns one ``requests.Session`` and one ``BoothStats`` that only it
writes.  The hot loop is lean on purpose, so that the generator is not the
bottleneck: a booth owns exactly one keep-alive connection, so it takes it
once from its session's transport adapter (the adapter's urllib3 pool makes
it, with the adapter's TLS settings) and drives it directly, skipping the
per-request work of the session, the adapter and the pool (settings,
cookies, hooks, ``Retry`` objects, the pool's queue and its "was the
connection dropped?" poll before every request, which a booth makes only
after it has been idle).  The request has the request line, ``Host``,
``Content-Type``, ``Content-Length`` and the body (prepared once per
booth), nothing else; the answer is read with the connection's own HTTP parser
(``http.client``, which urllib3's connection extends), without urllib3's
response wrapper.  A failed request closes the connection and the next one
reconnects.  A 409 answer's body is read, so the connection can be reused,
but not decoded.  Only 200 answers are decoded, for their serials.

Two loops:

* closed loop (default): each booth sends its next request when the previous
  one is answered (plus ``think`` seconds);
* open loop (``rate``): requests are due at a constant rate across all booths,
  booth ``b`` of ``n`` taking the slots ``b, b + n, b + 2n, ...``; latency is
  measured from a request's *intended* send time, so a stalled server cannot
  hide its delay by holding the booths back (coordinated-omission correction).
  With a ``schedule`` (``--stages``) the slots are due at the times it gives
  instead, the same way.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import requests
import urllib3.connection
import urllib3.exceptions
import urllib3.util

from loadtest import holdrun
from loadtest.history import Reply, buy_until_answered
from loadtest.stages import Schedule
from loadtest.stats import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_SOLD_OUT, BoothStats

__all__ = ["LoadPlan", "LoadResult", "classify_exception", "run_load"]

#: In "until sold out" mode a booth gives up after this many failures in a row,
#: so that a service that never answers sold out cannot keep it going forever.
GIVE_UP_AFTER = 100

#: How long booths may take to start before the run is abandoned, in seconds.
_START_TIMEOUT = 30.0

#: A booth idle for longer than this (think time, open-loop pacing) checks
#: that the server has not closed its keep-alive connection meanwhile before
#: sending, as urllib3's pool does; a busy booth skips that poll.
_IDLE_CHECK_S = 0.1

#: The answer to a request sent on a connection, read by ``http.client`` (the base
#: of urllib3's connection) rather than wrapped in urllib3's response: the wrapper
#: (header copies, decoders, its own buffering) costs more than the request.
_getresponse = http.client.HTTPConnection.getresponse

#: What driving the connection directly may raise.
_WIRE_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)


@dataclass(frozen=True)
class LoadPlan:
    """What to run.  ``requests`` and ``duration`` are stop conditions; with
    neither, each booth runs until the service answers sold out."""

    urls: tuple[str, ...]
    booths: int = 10
    quantity: int = 1
    requests: int | None = None
    duration: float | None = None
    rate: float | None = None
    think_s: float = 0.0
    timeout: float = 10.0
    processes: int = 1
    #: ``--stages``: an open loop whose rate ramps (``duration`` is then the stages' total).
    schedule: Schedule | None = None
    #: Every purchase carries an Idempotency-Key and is retried until it has a definite
    #: answer, for at most ``retry_for`` seconds (``--idempotent``, ``--faults``).
    idempotent: bool = False
    retry_for: float = 30.0
    #: ``--scenario hold``: each purchase is a hold, then a confirm, release or nothing.
    holds: holdrun.HoldPlan | None = None

    @property
    def until_sold_out(self) -> bool:
        return self.requests is None and self.duration is None

    @property
    def mode(self) -> str:
        return "open" if self.rate or self.schedule else "closed"

    def send_time(self, slot: int) -> float:
        """Seconds after the start at which open-loop request ``slot`` is due."""
        if self.schedule is not None:
            return self.schedule.send_time(slot)
        assert self.rate
        return slot / self.rate


@dataclass
class LoadResult:
    booths: list[BoothStats]
    #: Seconds from the start of the run until the last booth stopped.
    elapsed: float
    interrupted: bool


class _Budget:
    """A total request count shared by the closed-loop booths."""

    def __init__(self, total: int) -> None:
        self._left = total
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True


class _Control:
    """What the booths share: the start time, the stop flag and the budget."""

    def __init__(self, plan: LoadPlan, budget: int | None, origin: float | None,
                 booths: int) -> None:
        self.plan = plan
        self.stop = threading.Event()
        self.origin = 0.0
        self.deadline: float | None = None
        self.budget = _Budget(budget) if budget is not None and not plan.rate else None
        self._fixed_origin = origin
        self.barrier = threading.Barrier(booths + 1, action=self._set_origin)

    def _set_origin(self) -> None:
        fixed = self._fixed_origin
        self.origin = fixed if fixed is not None else time.perf_counter()
        if self.plan.duration is not None:
            self.deadline = self.origin + self.plan.duration


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (causes, contexts, reasons, args)."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < 50:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        todo.extend(x for x in inner if isinstance(x, BaseException))


def classify_exception(exc: BaseException) -> tuple[str, bool]:
    """Kind of a failed request and whether it may have reached the server.

    Kinds: ``refused`` (nothing listens), ``timeout``, ``reset`` (the
    connection broke before a whole answer came back), ``other``.  A request
    whose connection could not even be made cannot have sold anything; one
    that broke or timed out after it was sent may have.
    """
    chain = list(_chain(exc))

    def has(*types: type[BaseException]) -> bool:
        return any(isinstance(e, types) for e in chain)

    if has(ConnectionRefusedError):
        return "refused", False
    if has(urllib3.exceptions.NewConnectionError):  # a subclass of ConnectTimeoutError
        return "other", False
    if has(requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError):
        return "timeout", False
    if has(requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError):
        return "timeout", True
    if has(ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
           urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError):
        return "reset", True
    return "other", True


def _as_urllib3_error(exc: BaseException) -> BaseException:
    """A failure of a connection driven directly, wrapped as urllib3's pool wraps it.

    Connecting already raises urllib3's own errors (``NewConnectionError``,
    ``ConnectTimeoutError``); the socket and ``http.client`` errors of sending
    and reading are what the pool reports as "Connection aborted", and TLS
    errors as ``SSLError``.  So ``classify_exception`` answers the same kind
    as it would for the same failure through ``requests``.
    """
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return exc
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return urllib3.exceptions.SSLError(exc)
    return urllib3.exceptions.ProtocolError("Connection aborted.", exc)


# What a booth sends: POST /buy with this body and Content-Type (the bench makes wrk send
# the same, to compare the two generators on the same work for the server).
PURCHASE_CONTENT_TYPE = "application/json"


def purchase_body(quantity: int) -> bytes:
    return json.dumps({"quantity": quantity}).encode()


class _Booth:
    def __init__(self, index: int, url: str, control: _Control) -> None:
        plan = control.plan
        self.index = index
        self.control = control
        self.stats = BoothStats(booth=index + 1, url=url)
        self.instance = plan.urls.index(url)
        self.failure: BaseException | None = None
        self.last_done = -math.inf  # when this booth's last answer (or failure) came
        self.finished_at = 0.0
        self.session = requests.Session()
        body = purchase_body(plan.quantity)
        request = requests.Request("POST", url.rstrip("/") + "/buy", data=body,
                                   headers={"Content-Type": PURCHASE_CONTENT_TYPE})
        prepared = self.session.prepare_request(request)
        target = prepared.url or url
        # The adapter's pool for this URL, with the TLS settings the adapter would use.
        adapter = self.session.get_adapter(target)
        assert isinstance(adapter, requests.adapters.HTTPAdapter)
        pool = adapter.get_connection_with_tls_context(prepared, True)
        adapter.cert_verify(pool, target, True, None)
        # The booth's one connection: made by the pool (its class, socket and TLS
        # options), opened by the first request, reopened after a failure.
        self.conn = cast(urllib3.connection.HTTPConnection, pool._new_conn())
        self.conn.timeout = plan.timeout  # connect, and every read and write after
        self.path = prepared.path_url
        self.host = urllib3.util.parse_url(target).netloc or ""
        self.content_type = PURCHASE_CONTENT_TYPE
        self.body = body
        self.content_length = str(len(body))
        self.base_path = self.path.removesuffix("/buy")
        if plan.holds is not None:
            self.path = self.base_path + "/holds"
            self.body = json.dumps({"quantity": plan.quantity,
                                    "ttl_s": plan.holds.ttl_s}).encode()
            self.content_length = str(len(self.body))
        self.rng = random.Random(index)

    def run(self) -> None:
        try:
            self.control.barrier.wait(_START_TIMEOUT)
            early = self.control.origin - time.perf_counter()  # a start set by another process
            if early > 0 and self.control.stop.wait(early):
                return
            if self.control.plan.mode == "open":
                self._open_loop()
            else:
                self._closed_loop()
        except threading.BrokenBarrierError:
            pass  # the run was abandoned before it started
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self.failure = exc
            self.control.stop.set()
        finally:
            self.finished_at = time.perf_counter()
            self.conn.close()
            self.session.close()

    def _closed_loop(self) -> None:
        control = self.control
        plan = control.plan
        stop, budget, deadline = control.stop, control.budget, control.deadline
        think, until_sold_out = plan.think_s, plan.until_sold_out
        perf = time.perf_counter
        failures = 0
        while not stop.is_set():
            if deadline is not None and perf() >= deadline:
                break
            if budget is not None and not budget.take():
                break
            outcome = self._buy(perf())
            if outcome == OUTCOME_SOLD_OUT and until_sold_out:
                break
            failures = failures + 1 if outcome == OUTCOME_ERROR else 0
            if until_sold_out and failures >= GIVE_UP_AFTER:
                break
            if think and stop.wait(think):
                break

    def _open_loop(self) -> None:
        control = self.control
        plan = control.plan
        stop, deadline, due = control.stop, control.deadline, plan.send_time
        limit = plan.requests if plan.schedule is None else plan.schedule.total
        st = self.stats  # each request: when it was sent, where its records begin
        sent_at, sent_record, records = st.sent_at, st.sent_record, st.outcome
        until_sold_out = plan.until_sold_out
        perf = time.perf_counter
        slot, step = self.index, plan.booths  # the index is global across processes
        failures = 0
        while not stop.is_set():
            if limit is not None and slot >= limit:
                break
            intended = control.origin + due(slot)
            if deadline is not None and intended >= deadline:
                break
            delay = intended - perf()
            if delay > 0 and stop.wait(delay):
                break
            sent_at.append(perf() - control.origin)
            sent_record.append(len(records))
            outcome = self._buy(intended)
            if outcome == OUTCOME_SOLD_OUT and until_sold_out:
                break
            failures = failures + 1 if outcome == OUTCOME_ERROR else 0
            if until_sold_out and failures >= GIVE_UP_AFTER:
                break
            slot += step

    def _exchange(self, intended: float, key: str | None = None,
                  request: tuple[str, str] | None = None) -> Reply:
        """Send one purchase (or ``request``, a method and path without a body) on the
        booth's connection; its status and body, or the failure."""
        conn = self.conn
        try:
            if intended - self.last_done > _IDLE_CHECK_S and not conn.is_connected:
                conn.close()  # closed by the server while idle (or never opened): reopen
            method, path = request or ("POST", self.path)
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.host)
            if request is None:
                conn.putheader("Content-Type", self.content_type)
                conn.putheader("Content-Length", self.content_length)
            else:
                conn.putheader("Content-Length", "0")
            if key is not None:
                conn.putheader("Idempotency-Key", key)
            conn.endheaders(self.body if request is None else None)
            response = _getresponse(conn)
            body = response.read()  # read the whole body: the connection can be reused
        except _WIRE_ERRORS as exc:
            conn.close()  # a connection in an unknown state: the next request reconnects
            self.last_done = time.perf_counter()
            kind, maybe_sent = classify_exception(_as_urllib3_error(exc))
            return Reply(None, b"", kind, maybe_sent)
        self.last_done = time.perf_counter()
        return Reply(response.status, body)

    def _buy(self, intended: float) -> int:
        """Send one purchase, record it, and answer its OUTCOME_*."""
        if self.control.plan.idempotent:
            return self._buy_keyed(intended)
        if self.control.plan.holds is not None:
            return self._hold(intended, self.control.plan.holds)
        st = self.stats
        status, body, failure, maybe_sent = self._exchange(intended)
        now = self.last_done
        if status is None:
            st.errors[failure] += 1
            if maybe_sent:
                st.unknown_tickets += self.control.plan.quantity
            st.record(now - self.control.origin, int((now - intended) * 1e6), OUTCOME_ERROR)
            return OUTCOME_ERROR
        st.status_counts[status] += 1
        if status == 200:
            try:
                serials = [t["serial"] for t in json.loads(body)["tickets"]]
            except (ValueError, KeyError, TypeError):
                # A sale we cannot read: it may have sold, but we got no serial.
                st.errors["other"] += 1
                st.unknown_tickets += self.control.plan.quantity
                outcome = OUTCOME_ERROR
            else:
                st.serials.extend(serials)
                st.tickets += len(serials)
                outcome = OUTCOME_OK
        elif status == 409 and b"sold_out" in body:
            st.sold_out += 1
            outcome = OUTCOME_SOLD_OUT
        else:
            st.errors["5xx" if status >= 500 else "other"] += 1
            outcome = OUTCOME_ERROR
        st.record(now - self.control.origin, int((now - intended) * 1e6), outcome)
        return outcome

    def _send(self, intended: float, request: tuple[str, str] | None = None
              ) -> tuple[int | None, bytes, bool]:
        """One request of the hold scenario, recorded: its status (None when it failed),
        its body, and whether it may have reached the server."""
        st = self.stats
        status, body, failure, maybe_sent = self._exchange(intended, request=request)
        now = self.last_done
        if status is None:
            st.errors[failure] += 1
            outcome = OUTCOME_ERROR
        else:
            st.status_counts[status] += 1
            outcome = OUTCOME_OK if status < 400 or status == 410 else OUTCOME_ERROR
            if status == 409 and b"sold_out" in body:
                st.sold_out += 1
                outcome = OUTCOME_SOLD_OUT
            elif outcome == OUTCOME_ERROR:
                st.errors["5xx" if status >= 500 else "other"] += 1
        st.record(now - self.control.origin, int((now - intended) * 1e6), outcome)
        return status, body, maybe_sent

    def _hold(self, intended: float, plan: holdrun.HoldPlan) -> int:
        """Hold, then confirm, release or abandon: record what became of the hold.
        Answers the hold request's OUTCOME_* (sold out ends an until-sold-out booth)."""
        st, quantity = self.stats, self.control.plan.quantity
        status, body, maybe_sent = self._send(intended)
        if status is None:
            if maybe_sent:  # it may hold tickets until it expires
                st.holds.append(holdrun.HoldRecord(quantity, time.time() + plan.ttl_s,
                                                   holdrun.UNKNOWN))
            return OUTCOME_ERROR
        if status == 409 and b"sold_out" in body:
            return OUTCOME_SOLD_OUT
        try:
            made = json.loads(body)
            hold_id, expires_at = str(made["id"]), holdrun.parse_expiry(made["expires_at"])
        except (ValueError, KeyError, TypeError):
            st.errors["other"] += 1
            if status == 201:
                st.holds.append(holdrun.HoldRecord(quantity, time.time() + plan.ttl_s,
                                                   holdrun.UNKNOWN))
            return OUTCOME_ERROR
        if status != 201:
            return OUTCOME_ERROR
        record = holdrun.HoldRecord(quantity, expires_at, holdrun.ABANDONED)
        st.holds.append(record)
        if plan.confirm_after and self.control.stop.wait(plan.confirm_after):
            return OUTCOME_OK  # the run ends: the hold is left to expire
        draw = self.rng.random()
        if draw < plan.abandon:
            return OUTCOME_OK
        path = f"{self.base_path}/holds/{hold_id}"
        if draw < plan.abandon + plan.release:
            status, _, maybe_sent = self._send(time.perf_counter(), ("DELETE", path))
            if status == 204:
                record.fate = holdrun.RELEASED
            elif (status is None and maybe_sent) or status == 504:
                record.fate = holdrun.UNKNOWN
            return OUTCOME_OK
        status, body, maybe_sent = self._send(time.perf_counter(), ("POST", path + "/confirm"))
        if status == 200:
            try:
                record.serials = [t["serial"] for t in json.loads(body)["tickets"]]
            except (ValueError, KeyError, TypeError):
                st.errors["other"] += 1
                st.unknown_tickets += quantity
                record.fate = holdrun.UNKNOWN
                return OUTCOME_OK
            record.fate = holdrun.CONFIRMED
            st.serials.extend(record.serials)
            st.tickets += len(record.serials)
        elif status == 410:
            record.fate = holdrun.EXPIRED
        elif (status is None and maybe_sent) or status == 504:
            st.unknown_tickets += quantity  # the confirm may have sold them
            record.fate = holdrun.UNKNOWN
        return OUTCOME_OK

    def _buy_keyed(self, intended: float) -> int:
        """One keyed purchase, retried until it has an answer (loadtest.history); each
        attempt counts as a request, the purchase's answer once."""
        control, st = self.control, self.stats
        plan, origin = control.plan, control.origin
        first = True

        def send(key: str) -> Reply:
            nonlocal first
            at, first = (intended if first else time.perf_counter()), False
            return self._exchange(at, key)

        purchase = buy_until_answered(send, plan.quantity, booth=st.booth,
                                      instance=self.instance, origin=origin,
                                      retry_for=plan.retry_for, stop=control.stop)
        st.purchases.append(purchase)
        outcome = OUTCOME_ERROR
        for i, attempt in enumerate(purchase.attempts):
            status = attempt.status
            if status is None:
                st.errors[attempt.outcome if attempt.outcome != "connect" else "other"] += 1
                outcome = OUTCOME_ERROR
            else:
                st.status_counts[status] += 1
                if attempt.outcome == "200":
                    outcome = OUTCOME_OK
                elif attempt.outcome == "409 sold_out":
                    st.sold_out += 1
                    outcome = OUTCOME_SOLD_OUT
                else:
                    st.errors["5xx" if status >= 500 else "other"] += 1
                    outcome = OUTCOME_ERROR
            sent = intended - origin if i == 0 else attempt.start
            st.record(attempt.end, int((attempt.end - sent) * 1e6), outcome)
        if purchase.answer == "sold":
            st.serials.extend(purchase.serials)
            st.tickets += len(purchase.serials)
        elif purchase.answer == "unknown":
            st.unknown_tickets += plan.quantity
        return outcome


def run_load(plan: LoadPlan,
             on_tick: Callable[[Sequence[BoothStats], float], None] | None = None,
             tick_s: float = 0.2,
             *,
             booth_ids: Sequence[int] | None = None,
             budget: int | None = None,
             origin: float | None = None,
             should_stop: Callable[[], bool] | None = None) -> LoadResult:
    """Run the booths until they stop; call ``on_tick(stats, elapsed)`` now and then.

    By default this runs all ``plan.booths`` booths in this process.  A process
    that runs a share of them (``--processes``) passes its ``booth_ids``
    (0-based, global: they choose the URL and the open-loop slots), its share
    of the request ``budget``, the common ``origin`` (a ``perf_counter``
    time, the same clock in every process) and ``should_stop``, polled every
    tick.  Ctrl-C stops the booths (each finishes or times out its request in
    flight) and the partial result is returned with ``interrupted`` set.
    """
    if not plan.urls:
        raise ValueError("no URL to test")
    ids = range(plan.booths) if booth_ids is None else booth_ids
    control = _Control(plan, plan.requests if booth_ids is None else budget, origin, len(ids))
    booths = [_Booth(i, plan.urls[i % len(plan.urls)], control) for i in ids]
    threads = [threading.Thread(target=b.run, name=f"booth-{b.stats.booth}", daemon=True)
               for b in booths]
    for t in threads:
        t.start()
    interrupted = False
    try:
        control.barrier.wait(_START_TIMEOUT)
        for t in threads:
            while t.is_alive():
                t.join(tick_s)
                if on_tick is not None:
                    on_tick([b.stats for b in booths], time.perf_counter() - control.origin)
                if should_stop is not None and should_stop():
                    interrupted = True
                    control.stop.set()
    except KeyboardInterrupt:
        interrupted = True
        control.stop.set()
        control.barrier.abort()
        for t in threads:
            t.join(plan.timeout + 5.0)
    finally:
        control.stop.set()
    for b in booths:
        if b.failure is not None:
            raise b.failure
    ends = [b.finished_at for b in booths]
    elapsed = max(ends) - control.origin if control.origin and ends else 0.0
    return LoadResult(booths=[b.stats for b in booths], elapsed=max(elapsed, 0.0),
                      interrupted=interrupted)
