"""``--spawn``: run a local ticketbooth service for the length of a load test.

The service is started as a subprocess (``python -m app serve`` on
127.0.0.1, port 0, or a port ``--faults`` chose) and known only by the URLs it
prints; it is never imported. The tests start their service processes with
:func:`running_service` too.
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
from typing import IO

__all__ = ["ServiceProcess", "SpawnError", "running_service", "serve_command",
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


def service_command(argv: Sequence[str] = (), port: int = 0) -> list[str]:
    """``python -m app serve`` on loopback (port 0: a free one), with more arguments (they
    win)."""
    return [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port),
            *argv]


def serve_command(tickets: int, store: str, extra: Sequence[str] = (),
                  port: int = 0) -> list[str]:
    """The command line that starts the load generator's service."""
    argv = ["--tickets", str(tickets), "--store", store, *_NO_PER_CLIENT_LIMIT]
    if store == UNSAFE_STORE:
        argv.append("--allow-unsafe")
    return service_command([*argv, *extra], port)


def _pump(stream: IO[str], lines: queue.Queue[str | None], urls: list[str]) -> None:
    """Read the service's stdout to its end (so that it can never block on a full pipe),
    noting each URL it says it listens on."""
    for line in stream:
        match = _LISTENING.match(line)
        if match:
            urls.append(match.group(1))
        lines.put(line)
    lines.put(None)


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
        if self.hidden and self._limit:
            sys.stderr.write(f"[service] ... {self.hidden} more lines not shown\n")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


class ServiceProcess:
    """One service process, known by its command line; it can be started again after it
    stopped or was killed (``--faults``), and ``stop`` ends it whatever state it is in.

    ``start`` and ``stop`` may be called from different threads: ``stop`` also ends a
    process that is still starting, and after ``close`` nothing starts any more. Its stderr
    goes to ``stderr`` (a file or a descriptor) when given, else to ours, prefixed (see
    :class:`_StderrRelay`); its stdout is always read to its end.
    """

    def __init__(self, cmd: Sequence[str], *, stderr: IO[str] | int | None = None,
                 cwd: str | os.PathLike[str] | None = None) -> None:
        self.cmd = list(cmd)
        #: Lines of stderr passed on once it listens (a restarted service's: none).
        self.stderr_lines = STDERR_LINES
        self.proc: subprocess.Popen[str] | None = None
        #: The URLs the running process said it listens on (one per address), in order.
        self.urls: list[str] = []
        self._stderr = stderr
        self._cwd = cwd
        self._pump: threading.Thread | None = None
        self._relay: _StderrRelay | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def process(self) -> subprocess.Popen[str]:
        assert self.proc is not None, "the service is not running"
        return self.proc

    @property
    def url(self) -> str:
        return self.urls[0]

    def start(self, start_timeout: float = START_TIMEOUT) -> str:
        """Start the process and answer the URL it prints once it listens (SpawnError if it
        exits first or says nothing in time; it is then stopped)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self._lock:
            if self._closed:
                raise SpawnError("the service was stopped")
            self._reap()
            try:
                # Its own process group: a Ctrl-C at the terminal interrupts the load test,
                # which then still reads /remaining from the service before it stops it.
                proc = subprocess.Popen(
                    self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE if self._stderr is None else self._stderr,
                    text=True, env=env, cwd=self._cwd, process_group=0)
            except OSError as exc:
                raise SpawnError(f"cannot start the service ({' '.join(self.cmd)}): {exc}"
                                 ) from exc
            assert proc.stdout is not None
            self.proc = proc
            urls: list[str] = []
            self.urls = urls
            self._relay = relay = (_StderrRelay(proc.stderr, self.stderr_lines)
                                   if proc.stderr is not None else None)
            lines: queue.Queue[str | None] = queue.Queue()
            self._pump = threading.Thread(target=_pump, args=(proc.stdout, lines, urls),
                                          daemon=True, name="spawned-stdout")
            self._pump.start()
        deadline = time.monotonic() + start_timeout
        try:
            while not urls:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
                if line is None:
                    status = proc.wait(STOP_TIMEOUT)
                    raise SpawnError(f"the spawned service exited with status {status} "
                                     "before it was listening (its messages are above)")
            if relay is not None:
                relay.listening = True
            return urls[0]
        except queue.Empty:
            self.stop()
            raise SpawnError(f"the spawned service did not say it was listening "
                             f"within {start_timeout:g} s") from None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the running process (nothing when it has exited)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; its exit status (TimeoutExpired past ``timeout``)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """Stop the process (SIGCONT first, in case it is paused; then SIGTERM, then SIGKILL
        if it does not exit in time) and release its pipes; its exit status."""
        with self._lock:
            return self._reap()

    def close(self) -> None:
        """Stop the process, and refuse to start it again."""
        with self._lock:
            self._closed = True
            self._reap()

    def _reap(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        _stop(proc)
        if self._pump is not None:
            self._pump.join(STOP_TIMEOUT)  # the pipe ends when the service has exited
        assert proc.stdout is not None
        proc.stdout.close()
        if self._relay is not None:
            self._relay.finish()
        self.proc = self._pump = self._relay = None
        return proc.returncode


@contextmanager
def running_service(argv: Sequence[str], *, stderr: IO[str] | int | None = None,
                    cwd: str | os.PathLike[str] | None = None,
                    start_timeout: float = START_TIMEOUT) -> Iterator[ServiceProcess]:
    """Run ``argv`` (a command that starts the service), yield it once it listens, stop it
    when the block ends, however it ends."""
    service = ServiceProcess(argv, stderr=stderr, cwd=cwd)
    try:
        service.start(start_timeout)
        yield service
    finally:
        service.close()


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
