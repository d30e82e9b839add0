"""What an operator sees: Prometheus metrics and one access log line per request.

Both come from one WSGI middleware around the Flask app, which times each request once.
Each app has its own metrics registry, so several apps (tests, say) never share counters.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.inventory import DeferringStore, Store
from app.parking import ENVIRON_KEY

__all__ = ["AccessLog", "SalesRate", "Telemetry", "TelemetryMiddleware", "endpoint_of"]

# The access log writes its lines straight to stderr: one os.write per line, which is
# atomic for lines this short, needs no lock, and costs a fraction of a logging record.
_STDERR = 2

log = logging.getLogger("ticketbooth")

# Known paths -> the endpoint label; anything else is "other" (keeps label values bounded).
_ENDPOINTS = {path: path for path in (
    "/", "/buy", "/remaining", "/healthz", "/metrics", "/openapi.json", "/admin/restock",
    "/admin/stats", "/holds")}
#: Outcomes of holds, counted by the instance that decided them (expiries by the one that
#: cleaned them up).
HOLD_OUTCOMES = ("created", "confirmed", "released", "expired")
_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0)


def endpoint_of(path: str) -> str:
    endpoint = _ENDPOINTS.get(path)
    if endpoint is not None:
        return endpoint
    if path.startswith("/tickets/"):
        return "/tickets/{serial}"
    if path.startswith("/holds/"):
        return "/holds/{id}/confirm" if path.endswith("/confirm") else "/holds/{id}"
    return "other"


class SalesRate:
    """Tickets sold per second over the last minute, in one-second buckets."""

    WINDOW = 60

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seconds = [0] * self.WINDOW  # which second each bucket holds
        self._tickets = [0] * self.WINDOW

    def add(self, tickets: int) -> None:
        second = int(self._clock())
        index = second % self.WINDOW
        with self._lock:
            if self._seconds[index] != second:
                self._seconds[index], self._tickets[index] = second, 0
            self._tickets[index] += tickets

    def last_minute(self) -> int:
        now = int(self._clock())
        with self._lock:
            return sum(tickets for second, tickets in zip(self._seconds, self._tickets,
                                                         strict=True)
                       if now - self.WINDOW < second <= now)


class _StockCollector(Collector):
    """Stock gauges read from the store when scraped, and the outcomes of holds."""

    def __init__(self, store: Store, telemetry: Telemetry) -> None:
        self._store = store
        self._telemetry = telemetry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        counts = self._store.counts()
        yield GaugeMetricFamily("ticketbooth_tickets_remaining", "Tickets left to sell.",
                                value=counts.remaining)
        yield GaugeMetricFamily("ticketbooth_tickets_stock", "Tickets in stock, sold or not.",
                                value=counts.total)
        yield GaugeMetricFamily("ticketbooth_tickets_held",
                                "Tickets in live holds (not confirmed, released or expired).",
                                value=counts.held)
        holds = CounterMetricFamily("ticketbooth_holds",
                                    "Holds by outcome, as decided by this instance.",
                                    labels=["outcome"])
        for outcome, value in self._telemetry.hold_outcomes().items():
            holds.add_metric([outcome], value)
        yield holds
        if isinstance(self._store, DeferringStore):  # a group commit: its batches
            stats = self._store.commit_stats()
            yield CounterMetricFamily(
                "ticketbooth_commit_batches", "Batches of orders this instance handed to the "
                "store to commit, one transaction each (failed ones too).", value=stats.batches)
            yield CounterMetricFamily(
                "ticketbooth_commit_orders", "Orders in those batches (over the batches: the "
                "orders per commit).", value=stats.orders)
            yield CounterMetricFamily(
                "ticketbooth_commit_batches_pipelined", "Of those batches, the ones that left "
                "while another was on its way (the database is far away).",
                value=stats.pipelined)


class AccessLog:
    """Access lines written to a file descriptor, one ``os.write`` each.

    A line that cannot be written (the reader of stderr went away, say) is dropped and
    counted, never raised into the request it describes: its answer stands. The first line
    written once writing works again is one saying how many were dropped.
    """

    def __init__(self, fd: int, dropped: Counter) -> None:
        self._fd = fd
        self._dropped = dropped
        self._lock = threading.Lock()
        self._unreported = 0  # dropped lines not yet owned up to in the log

    def write(self, line: str) -> None:
        try:
            if self._unreported:
                self._report_dropped()
            os.write(self._fd, f"{line}\n".encode())
        except OSError:
            self._dropped.inc()
            with self._lock:
                self._unreported += 1

    def _report_dropped(self) -> None:
        with self._lock:
            dropped = self._unreported
            if not dropped:
                return
            os.write(self._fd, f"ticketbooth: {dropped} access log lines could not be "
                               "written and were dropped\n".encode())
            self._unreported -= dropped


class Telemetry:
    def __init__(self, store: Store, access_format: str = "plain", log_level: str = "info",
                 clock: Callable[[], float] = time.time, log_fd: int = _STDERR) -> None:
        # Access lines are info-level: a higher --log-level hides them as well.
        self.access_format = access_format if log_level in ("debug", "info") else "off"
        self.started_at = clock()
        self.sales_rate = SalesRate(clock)
        self.registry = CollectorRegistry()
        self.tickets_sold = Counter("ticketbooth_tickets_sold",
                                    "Tickets sold by this instance.", registry=self.registry)
        self.replays = Counter("ticketbooth_idempotent_replays",
                               "Answers replayed for a repeated Idempotency-Key.",
                               registry=self.registry)
        self.store_errors = Counter("ticketbooth_store_errors",
                                    "Requests that failed because the store could not serve.",
                                    registry=self.registry)
        self.requests = Counter("ticketbooth_http_requests", "HTTP requests answered.",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.duration = Histogram("ticketbooth_http_request_duration_seconds",
                                  "Time to answer an HTTP request.", ["endpoint"],
                                  buckets=_DURATION_BUCKETS, registry=self.registry)
        self.log_lines_dropped = Counter("ticketbooth_log_lines_dropped",
                                         "Access log lines dropped because they could not be "
                                         "written.", registry=self.registry)
        self.access_log = AccessLog(log_fd, self.log_lines_dropped)
        self._store = store
        self._holds = dict.fromkeys(HOLD_OUTCOMES[:-1], 0)
        self._holds_lock = threading.Lock()
        self.registry.register(_StockCollector(store, self))
        # Label lookups are slow next to the rest of a request: keep the children.
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}

    def total(self, sample: str) -> int:
        """A counter's current value, e.g. ``ticketbooth_tickets_sold_total``."""
        return int(self.registry.get_sample_value(sample) or 0)

    def sold(self, tickets: int) -> None:
        # Called once the sale is committed: nothing here may turn its answer into an error.
        try:
            self.tickets_sold.inc(tickets)
            self.sales_rate.add(tickets)
        except Exception:
            log.exception("counting a sale of %d tickets failed", tickets)

    def held(self, outcome: str) -> None:
        """Count a hold created, confirmed or released here."""
        with self._holds_lock:
            self._holds[outcome] += 1

    def hold_outcomes(self) -> dict[str, int]:
        """Holds by outcome decided by this instance (expiries: cleaned up here)."""
        with self._holds_lock:
            outcomes = dict(self._holds)
        outcomes["expired"] = self._store.holds_expired()
        return outcomes

    def observe(self, method: str, path: str, query: str, status: str, seconds: float,
                replayed: bool, remote: str) -> None:
        endpoint = endpoint_of(path)
        code = status[:3]
        key = (endpoint, method, code)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children.setdefault(key, self.requests.labels(*key))
        child.inc()
        duration = self._duration_children.get(endpoint)
        if duration is None:
            duration = self._duration_children.setdefault(endpoint,
                                                          self.duration.labels(endpoint))
        duration.observe(seconds)
        if replayed:
            self.replays.inc()
        if code == "503":
            self.store_errors.inc()
        if self.access_format != "off":
            self._log(method, f"{path}?{query}" if query else path, code, seconds, replayed,
                      remote)

    def _log(self, method: str, path: str, code: str, seconds: float, replayed: bool,
             remote: str) -> None:
        if self.access_format == "json":
            line = json.dumps({"remote": remote, "method": method, "path": path,
                               "status": int(code), "duration_ms": round(seconds * 1000, 3),
                               "replayed": replayed}, separators=(",", ":"))
        else:
            line = (f'{remote} "{method} {path}" {code} {seconds * 1000:.2f}ms'
                    f"{' replayed' if replayed else ''}")
        self.access_log.write(line)


class TelemetryMiddleware:
    """Times every request and hands it to :class:`Telemetry`."""

    def __init__(self, app: Callable[..., Iterable[bytes]], telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        parking = environ.get(ENVIRON_KEY)  # a parked request started on its first run
        started = time.perf_counter() if parking is None else parking.started
        answer: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            answer.append(status)
            answer.append(headers)
            return start_response(status, headers, *exc_info)

        body = self.app(environ, capture)  # Flask has called start_response by now
        status, headers = answer[-2], answer[-1]
        # The answer is decided (a sale may be committed): observing it must not change it.
        try:
            replayed = any(name == "Idempotent-Replayed" for name, _ in headers)
            self.telemetry.observe(environ.get("REQUEST_METHOD", "?"),
                                   environ.get("PATH_INFO", ""),
                                   environ.get("QUERY_STRING", ""), status,
                                   time.perf_counter() - started, replayed,
                                   environ.get("REMOTE_ADDR", "-"))
        except Exception:
            log.exception("recording %s %s failed", environ.get("REQUEST_METHOD"),
                          environ.get("PATH_INFO"))
        return body
