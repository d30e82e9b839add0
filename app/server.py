"""waitress, run so that it can stop gracefully.

waitress's own ``run()`` loops until interrupted and then abandons responses still in
its buffers. We drive waitress's event loop ourselves instead, so that a stop request
(SIGTERM, SIGINT, or :meth:`Server.stop` from another thread) first stops accepting,
then lets in-flight requests finish and their responses flush, up to a grace period.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import WSGITask

from app.errors import json_bytes
from app.listening import bind_listeners
from app.parking import ENVIRON_KEY, PARK_EXTENSION, WITHDRAW_EXTENSION, Parking
from app.settings import Settings

__all__ = ["Server"]

log = logging.getLogger("ticketbooth")

# How long one turn of the event loop may wait for activity: also how quickly a stop
# requested from a signal handler is noticed.
_POLL_S = 0.1
# How often connections are looked over for requests past --request-timeout.
_SWEEP_S = 0.25
# Connections past --max-connections-per-client that one address may have waiting for their
# 429 answer at once; any more are closed unanswered, so that refusals cannot fill the
# server either.
_REFUSALS_PER_CLIENT = 8


class ClientSlots:
    """How many connections each client address holds, against a per-address limit.

    ``take`` says what to do with a new connection: serve it, answer it 429 (a few per
    address at a time, so a client that opened too many learns why) or close it at once.
    """

    SERVE, REFUSE, DROP = "serve", "refuse", "drop"

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self._lock = threading.Lock()  # connections open on the event loop; close anywhere
        self._held: dict[str, int] = {}
        self._refusing: dict[str, int] = {}

    def take(self, address: str) -> str:
        with self._lock:
            held = self._held.get(address, 0)
            if not self.limit or held < self.limit:
                self._held[address] = held + 1
                return self.SERVE
            refusing = self._refusing.get(address, 0)
            if refusing < _REFUSALS_PER_CLIENT:
                self._refusing[address] = refusing + 1
                return self.REFUSE
            return self.DROP

    def give_back(self, address: str, taken: str) -> None:
        counts = {self.SERVE: self._held, self.REFUSE: self._refusing}.get(taken)
        if counts is None:
            return
        with self._lock:
            left = counts[address] - 1
            if left:
                counts[address] = left
            else:
                del counts[address]


def _too_many_connections(limit: int) -> bytes:
    body = json_bytes({"error": "too_many_connections",
                       "message": f"this client address already holds {limit} connections, "
                                  "the most allowed (--max-connections-per-client)"})
    return (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


def _request_timeout(seconds: float) -> bytes:
    body = json_bytes({"error": "request_timeout",
                       "message": f"the request did not arrive whole within {seconds:g} s "
                                  "(--request-timeout)"})
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class _Task(WSGITask):
    """waitress's WSGI task, giving the app a parked request's :class:`Parking`."""

    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        parking = getattr(self.request, "ticketbooth_parking", None)
        if parking is not None:
            environ[ENVIRON_KEY] = parking
        return environ


class _Channel(HTTPChannel):
    """waitress's HTTP channel, without a busy loop under load, and able to park requests.

    While a task runs, waitress's ``handle_write`` only *tries* the output lock, which the
    worker holds while it writes its own response. Reporting the socket writable then makes
    poll return at once, fail the lock, and poll again: the main loop spins, and holds the
    GIL the worker needs to finish and release the lock. So while a task runs, we ask to
    write only when the worker waits for us (its output passed the high watermark) or the
    connection is to close; the rest is flushed by the worker, or right after its task ends.
    """

    task_class = _Task
    # Which ClientSlots answer this connection had, and when the request now arriving
    # began (its first byte): the sweep closes it once --request-timeout has passed.
    ticketbooth_slot: str | None = None
    ticketbooth_first_byte: float | None = None
    # waitress's own attributes that this class sets (it has no type hints).
    request: Any
    will_close: bool
    close_when_flushed: bool

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.ticketbooth_opened = time.monotonic()
        self.ticketbooth_slot = server.ticketbooth_slots.take(addr[0])
        if self.ticketbooth_slot == ClientSlots.DROP:
            self.handle_close()

    def del_channel(self, map: Any = None) -> None:
        # waitress calls this once the connection is out of the socket map; give its slot
        # back once, however it was closed.
        super().del_channel(map)
        if self.ticketbooth_slot is not None:
            self.server.ticketbooth_slots.give_back(self.addr[0], self.ticketbooth_slot)
            self.ticketbooth_slot = None

    def received(self, data: bytes) -> bool:
        if self.ticketbooth_slot == ClientSlots.REFUSE:
            # Past --max-connections-per-client: what was sent is read (so that closing
            # does not reset the connection under the answer) and answered 429, once.
            if data and not (self.close_when_flushed or self.will_close):
                self.write_soon(_too_many_connections(self.server.ticketbooth_slots.limit))
                self.close_when_flushed = True
            return True
        handled: bool = super().received(data)
        # waitress keeps the request still arriving in self.request (None between requests).
        if self.request is None:
            self.ticketbooth_first_byte = None
        elif self.ticketbooth_first_byte is None:
            self.ticketbooth_first_byte = time.monotonic()
        return handled

    def expire_slow_request(self, now: float, timeout: float) -> None:
        """Close the connection when its request has taken more than ``timeout`` to arrive.

        Called on the event loop's thread. A request line read gets a 408 answer first;
        a connection refused past the per-client limit that never sent its request is
        closed too.
        """
        if self.will_close or self.close_when_flushed:
            return
        if self.ticketbooth_slot == ClientSlots.REFUSE:
            if now - self.ticketbooth_opened >= timeout:
                self.will_close = True
            return
        started = self.ticketbooth_first_byte
        # While a request is served or an answer is still going out, the next request waits
        # its turn (and writing here could wait for this very thread to flush).
        if started is None or now - started < timeout or self.total_outbufs_len:
            return
        with self.requests_lock:
            if self.requests:
                return
            request = self.request
            # waitress's parser holds the header bytes so far in header_plus, and has a
            # body_rcv once the headers are done.
            line_read = request is not None and (request.body_rcv is not None
                                                 or b"\n" in request.header_plus.lstrip())
            if request is not None:
                request.close()  # its body buffer, if it had one
            self.request = None
            self.ticketbooth_first_byte = None
            if line_read:
                self.write_soon(_request_timeout(timeout))
                self.close_when_flushed = True
            else:
                self.will_close = True

    def park_first(self) -> bool:
        """Offer the first request in line to the app's parking hook; True when it is parked.

        Called where waitress would queue the channel for a worker: on the event loop's
        thread as soon as a request is read, or on a worker for the next request in line.
        """
        park = self.server.ticketbooth_park
        request = self.requests[0]
        if (park is None or request.error
                or getattr(request, "ticketbooth_parking", None) is not None):
            return False
        dispatcher = self.server.task_dispatcher

        def parking() -> Parking:
            # Made only for a request the hook parks, and set on it before the hand-over:
            # the outcome may queue this channel again at once. It is queued with the
            # dispatcher itself, for a worker to run it through the app.
            made = request.ticketbooth_parking = Parking(lambda: dispatcher.add_task(self))
            return made

        try:
            parked = park(request.command, request.path, request.query, request.headers,
                          request.get_body_stream(), parking)
        except Exception:  # the run that answers reports it; the event loop goes on
            log.exception("parking %s %s failed", request.command, request.path)
            parked = False
        if not parked:
            request.ticketbooth_parking = None
        return parked

    def service(self) -> None:
        if not self.requests:  # closed while its request was parked
            return
        super().service()

    def writable(self) -> bool:
        if self.will_close or self.close_when_flushed:
            return True
        if self.requests:
            return bool(self.total_outbufs_len > self.adj.outbuf_high_watermark)
        return bool(self.total_outbufs_len)


class Server:
    def __init__(self, settings: Settings, app: Callable[..., Any]) -> None:
        self.settings = settings
        self._map: dict[int, Any] = {}
        self._stopping = threading.Event()
        self._next_sweep = 0.0
        # Bound here (app.listening), so that every address of --host is listened on and a
        # bad host or port is one clear error; waitress serves the sockets it is given.
        sockets = bind_listeners(settings.host, settings.port)
        self._server = create_server(
            app,
            map=self._map,
            sockets=sockets,
            threads=settings.threads,
            ident="ticketbooth",
            connection_limit=settings.connection_limit,
            channel_timeout=settings.channel_timeout,
            # How often idle connections are looked for: often enough to honour the timeout.
            cleanup_interval=max(1, min(30, settings.channel_timeout // 2)),
            # Our app enforces the body limit itself and answers 413 in JSON; waitress's
            # own limit only guards against bodies far past it.
            max_request_body_size=max(settings.max_body_bytes * 4, 1 << 20),
            clear_untrusted_proxy_headers=True,
        )

        # With several sockets waitress makes one server object per socket, and returns a
        # MultiSocketServer over them, which has no channel class or hooks of its own: the
        # per-socket servers are found in the socket map they share, and each gets them.
        self._listeners = [item for item in self._map.values()
                           if isinstance(item, BaseWSGIServer)]
        slots = ClientSlots(settings.per_client_limit)
        for listener in self._listeners:
            listener.channel_class = _Channel
            listener.ticketbooth_slots = slots
        # The app's parking hook (app.parking), when its store defers sales. A request that
        # can be parked is parked where waitress would queue it for a worker, so it costs
        # no worker a turn until its outcome is known.
        extensions = getattr(app, "extensions", {})
        self._withdraw: Callable[[], int] | None = extensions.get(WITHDRAW_EXTENSION)
        park = extensions.get(PARK_EXTENSION)
        for listener in self._listeners:
            listener.ticketbooth_park = park
        if park is not None:
            dispatcher = self._server.task_dispatcher

            def add_task(task: Any) -> None:
                if not (isinstance(task, _Channel) and task.park_first()):
                    dispatcher.add_task(task)

            for listener in self._listeners:
                listener.add_task = add_task

    @property
    def urls(self) -> list[str]:
        """One URL per listening address; IPv4 first."""
        urls = []
        for listener in self._listeners:
            host = listener.effective_host
            if ":" in host:
                host = f"[{host}]"
            urls.append(f"http://{host}:{listener.effective_port}")
        return urls

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def port(self) -> int:
        return int(self._listeners[0].effective_port)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a graceful stop (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag here: the loop notices within _POLL_S.
        self._stopping.set()

    def stop(self) -> None:
        """Ask the server to stop; safe from any thread."""
        self._stopping.set()

    def serve(self) -> None:
        """Serve until asked to stop, then drain and close. Returns when fully closed."""
        while not self._stopping.is_set():
            wasyncore.loop(timeout=_POLL_S, use_poll=True, map=self._map, count=1)
            self._sweep()
        self._drain(time.monotonic() + self.settings.shutdown_timeout)

    def _sweep(self) -> None:
        """Close connections whose request takes longer than --request-timeout to arrive."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_S
        timeout = self.settings.request_timeout
        for channel in list(self._map.values()):
            if isinstance(channel, _Channel):
                channel.expire_slow_request(now, timeout)

    def _drain(self, deadline: float) -> None:
        """Stop accepting, let in-flight requests finish, then stop the workers.

        When the grace period is over with requests still in flight, the store's queued
        orders are withdrawn unsold (answered 503), and the sales it is committing are
        committed and answered before the workers stop: no sale is committed unanswered.
        The store tells every order its outcome within ``--order-timeout``, which bounds
        that wait.
        """
        # Stop accepting: close the listening sockets, keep the triggers and the channels.
        for listener in self._listeners:
            wasyncore.dispatcher.close(listener)
        busy = self._settle(deadline, self._in_flight)
        if busy:
            log.warning("shutdown grace period over with %d request(s) in flight", busy)
            if self._withdraw is not None:
                withdrawn = self._withdraw()
                if withdrawn:
                    log.warning("%d queued sale(s) withdrawn unsold", withdrawn)
            self._settle(time.monotonic() + self.settings.order_timeout + 1.0, self._answering)
        # Let the closes we asked for happen, then stop the worker threads.
        wasyncore.loop(timeout=0.01, use_poll=True, map=self._map, count=2)
        self._server.task_dispatcher.shutdown(timeout=max(1.0, deadline - time.monotonic()))
        for listener in self._listeners:  # each has a trigger of its own
            listener.trigger.close()
        wasyncore.close_all(self._map)

    def _settle(self, deadline: float, busy: Callable[[], int]) -> int:
        """Run the event loop until ``busy()`` is 0 or ``deadline`` passes; the last count."""
        while (count := busy()) and time.monotonic() < deadline:
            wasyncore.loop(timeout=0.01, use_poll=True, map=self._map, count=1)
        return count

    def _channels(self) -> list[HTTPChannel]:
        return [c for c in list(self._map.values()) if isinstance(c, HTTPChannel)]

    def _in_flight(self) -> int:
        """Connections with a request or an answer in flight; idle ones are closed."""
        busy = 0
        for channel in self._channels():
            if channel.requests or channel.total_outbufs_len:
                busy += 1
            else:
                channel.will_close = True  # idle keep-alive connection: close it
        return busy

    def _answering(self) -> int:
        """Answers still to come: parked requests waiting for their outcome, requests
        queued for or run by a worker, and answers not yet flushed to their client."""
        # The dispatcher's queue and count of busy workers are waitress internals (no
        # public way to ask whether a worker still has an answer to give).
        dispatcher = self._server.task_dispatcher
        with dispatcher.lock:
            working = len(dispatcher.queue) + dispatcher.active_count
        for channel in self._channels():
            parking = (getattr(channel.requests[0], "ticketbooth_parking", None)
                       if channel.requests else None)
            if (parking is not None and parking.waiting) or channel.total_outbufs_len:
                working += 1
        return working
