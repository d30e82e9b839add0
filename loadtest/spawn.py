"""``--spawn``: run a local ticketbooth service for the length of a load test.

The service is started as a subprocess (``python -m app serve`` on
127.0.0.1, port 0) and known only by the URLs it prints; it is never imported.
The tests start their service processes with :func:`running_service` too.
Every wait is bounded, and the process is always stopped (SIGTERM, then
SIGKILL if it does not exit in time) when the ``with`` block ends.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

__all__ = ["SpawnError", "SpawnedService", "running_service", "serve_command",
           "service_command", "spawned_service"]

_LISTENING = re.compile(r"^ticketbooth listening on (http://\S+)\s*$")
#: Seconds to wait for the service to print its listening line.
START_TIMEOUT = 30.0
#: Seconds to wait for the service to exit after SIGTERM before killing it.
STOP_TIMEOUT = 10.0
#: Lines of the service's stderr passed on, once it listens, before the rest are only counted.
STDERR_LINES = 5

UNSAFE_STORE = "unsafe-memory"
# The spawned service serves only this generator, from one address: with more booths than
# the service's per-client connection limit, the limit would refuse the extra booths.
_NO_PER_CLIENT_LIMIT = ("--max-connections-per-client", "0")


class SpawnError(Exception):
    """The service could not be started."""


def service_command(argv: Sequence[str] = ()) -> list[str]:
    """``python -m app serve`` on a free loopback port, with more arguments (they win)."""
    return [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", "0",
            *argv]


def serve_command(tickets: int, store: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line that starts the load generator's service."""
    argv = ["--tickets", str(tickets), "--store", store, *_NO_PER_CLIENT_LIMIT]
    if store == UNSAFE_STORE:
        argv.append("--allow-unsafe")
    return service_command([*argv, *extra])


@dataclass
class SpawnedService:
    """A started service: its process and the URLs it said it listens on."""

    process: subprocess.Popen[str]
    urls: list[str] = field(default_factory=list)  # more come as the service prints them

    @property
    def url(self) -> str:
        return self.urls[0]

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; its exit status."""
        _stop(self.process)
        return self.process.wait(STOP_TIMEOUT)


class _StderrRelay:
    """Pass the service's stderr on to ours, prefixed.

    Everything until the service listens (so a failed start is explained in
    full), then up to ``limit`` lines: a busy service can log a line per
    request (waitress warns of every queued task), which would drown the
    report, so the rest are counted and summed up.
    """

    def __init__(self, stream: IO[str], limit: int = STDERR_LINES) -> None:
        self._stream = stream
        self._limit = limit
        self.hidden = 0
        self.listening = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="spawned-stderr")
        self._thread.start()

    def _run(self) -> None:
        shown = 0
        for line in self._stream:
            if not self.listening or shown < self._limit:
                sys.stderr.write(f"[service] {line}")
                sys.stderr.flush()
                shown += self.listening
            else:
                self.hidden += 1

    def finish(self) -> None:
        self._thread.join(STOP_TIMEOUT)  # the pipe ends when the service has exited
        self._stream.close()
        if self.hidden:
            sys.stderr.write(f"[service] ... {self.hidden} more lines not shown\n")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@contextmanager
def running_service(argv: Sequence[str], *, stderr: IO[str] | int | None = None,
                    cwd: str | os.PathLike[str] | None = None,
                    start_timeout: float = START_TIMEOUT) -> Iterator[SpawnedService]:
    """Run ``argv`` (a command that starts the service), yield it once it listens, stop it.

    The service's stdout is read to its end, and its stderr goes to ``stderr`` (a file, or
    a descriptor) when given, else to ours (see :class:`_StderrRelay`); so the service can
    never block on a full pipe, however much it logs.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        # Its own process group: a Ctrl-C at the terminal interrupts the load test, which
        # then still reads /remaining from the service before it stops it.
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if stderr is None else stderr,
                                text=True, env=env, cwd=cwd, process_group=0)
    except OSError as exc:
        raise SpawnError(f"cannot start the service ({' '.join(argv)}): {exc}") from exc
    assert proc.stdout is not None
    relay = _StderrRelay(proc.stderr) if proc.stderr is not None else None
    service = SpawnedService(proc)
    lines: queue.Queue[str | None] = queue.Queue()
    pump = threading.Thread(target=_pump_urls, args=(proc.stdout, lines, service.urls),
                            daemon=True, name="spawned-stdout")
    try:
        pump.start()
        deadline = time.monotonic() + start_timeout
        try:
            while not service.urls:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
                if line is None:
                    status = proc.wait(STOP_TIMEOUT)
                    raise SpawnError(f"the spawned service exited with status {status} "
                                     "before it was listening (its messages are above)")
        except queue.Empty:
            raise SpawnError(f"the spawned service did not say it was listening "
                             f"within {start_timeout:g} s") from None
        if relay is not None:
            relay.listening = True
        yield service
    finally:
        _stop(proc)
        pump.join(STOP_TIMEOUT)  # the pipe ends when the service has exited
        proc.stdout.close()
        if relay is not None:
            relay.finish()


def _pump_urls(stream: IO[str], lines: queue.Queue[str | None], urls: list[str]) -> None:
    """Read the service's stdout to its end, noting each URL it says it listens on."""
    for line in stream:
        match = _LISTENING.match(line)
        if match:
            urls.append(match.group(1))
        lines.put(line)
    lines.put(None)


@contextmanager
def spawned_service(tickets: int, store: str, extra: Sequence[str] = (),
                    start_timeout: float = START_TIMEOUT) -> Iterator[str]:
    """Start the load generator's service, yield its base URL, stop it afterwards.

    The service's stderr (its logs and warnings) goes to ours, prefixed with
    ``[service]``, up to STDERR_LINES lines.
    """
    with running_service(serve_command(tickets, store, extra),
                         start_timeout=start_timeout) as service:
        yield service.url
