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
from waitress.server import create_server
from waitress.task import WSGITask

from app.parking import ENVIRON_KEY, PARK_EXTENSION, WITHDRAW_EXTENSION, Parking
from app.settings import Settings

__all__ = ["Server"]

log = logging.getLogger("ticketbooth")

# How long one turn of the event loop may wait for activity: also how quickly a stop
# requested from a signal handler is noticed.
_POLL_S = 0.1


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
        self._server = create_server(
            app,
            map=self._map,
            host=settings.host,
            port=settings.port,
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

        self._server.channel_class = _Channel
        extensions = getattr(app, "extensions", {})
        self._withdraw: Callable[[], int] | None = extensions.get(WITHDRAW_EXTENSION)
        # The app's parking hook (app.parking), when its store defers sales. A request that
        # can be parked is parked where waitress would queue it for a worker, so it costs
        # no worker a turn until its outcome is known.
        park = self._server.ticketbooth_park = extensions.get(PARK_EXTENSION)
        if park is not None:
            dispatcher = self._server.task_dispatcher

            def add_task(task: Any) -> None:
                if not (isinstance(task, _Channel) and task.park_first()):
                    dispatcher.add_task(task)

            self._server.add_task = add_task

    @property
    def url(self) -> str:
        host = self._server.effective_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._server.effective_port}"

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

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
        self._drain(time.monotonic() + self.settings.shutdown_timeout)

    def _drain(self, deadline: float) -> None:
        """Stop accepting, let in-flight requests finish, then stop the workers.

        When the grace period is over with requests still in flight, the store's queued
        orders are withdrawn unsold (answered 503), and the sales it is committing are
        committed and answered before the workers stop: no sale is committed unanswered.
        The store tells every order its outcome within ``--order-timeout``, which bounds
        that wait.
        """
        wasyncore.dispatcher.close(self._server)  # the listening socket; keep the channels
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
        self._server.trigger.close()
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
