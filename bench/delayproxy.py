"""A TCP proxy that delays every chunk by a fixed time in each direction: a database "D ms
away" for the bench (``python -m bench.delayproxy --target HOST:PORT --delay-ms D``).

It listens on 127.0.0.1 (port 0: a free one) and prints ``listening on tcp://127.0.0.1:PORT``
once it accepts. For each client it opens one connection to the target, and in each
direction one thread stamps every chunk it reads with a due time (its arrival in the
kernel plus D), queues it, and forwards the queued chunks in order, each no sooner than
its due time.
Reading goes on while chunks wait, so the delay adds latency, not a limit on throughput:
chunks read 0.1 ms apart leave 0.1 ms apart, D later (as on a link with a long
propagation delay). An end of stream is delayed like data and passed on as a
half-close; a reset or error on either side closes both. With D = 0 it forwards at once:
its own cost. It runs until it is signalled (SIGTERM ends it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from types import FrameType

from loadtest.argtypes import non_negative_float, non_negative_int

__all__ = ["DelayProxy", "main", "parse_target"]

#: prctl(2)'s option that sets the calling thread's timer slack.
PR_SET_TIMERSLACK = 29
#: Bytes read at once from either side.
CHUNK = 64 * 1024
#: Linux's SO_TIMESTAMPNS (the socket module does not name it): each read comes with the
#: kernel's time of the data's arrival on the socket, as a struct timespec (realtime).
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
#: How long before a chunk's due time its thread stops sleeping and polls the clock
#: instead: a timer wakes a thread tens of microseconds late here, and a sleeping CPU later
#: still, which would lengthen every delay.
SPIN_S = 0.0002
#: The signals that end the proxy.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` to a host and a port (argparse type)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host, int(port)


class _Direction:
    """One direction of one connection, pumped by one thread: it reads each chunk as it
    comes, stamps it with its due time and queues it, and sends the queued chunks at their
    due times, waiting for whichever comes first. A chunk's delay counts from when the
    kernel received it (``SO_TIMESTAMPNS``, where there is one), not from when this thread
    woke to read it, and its thread sleeps until ``SPIN_S`` before its due time, then
    polls the clock, so neither wake-up adds to the delay. ``select`` waits to the
    microsecond (an event loop's timers wake on whole milliseconds, which would add most
    of a millisecond to every delay). Reading waits for sending only while the receiver's
    socket buffer is full."""

    def __init__(self, source: socket.socket, sink: socket.socket, delay_s: float,
                 closed: threading.Event) -> None:
        self.source, self.sink, self.delay_s, self.closed = source, sink, delay_s, closed
        self.stamped = False
        if delay_s:
            with contextlib.suppress(OSError):
                source.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self.stamped = True
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        queue: deque[tuple[float, bytes]] = deque()
        reading = True
        while reading or queue:
            timeout = None
            if queue:
                timeout = queue[0][0] - time.monotonic()
                if timeout <= 0:  # due: send it (never early)
                    if not self._send(queue.popleft()[1]):
                        return
                    continue
                if timeout <= SPIN_S:  # nearly due: poll the clock, letting others run
                    time.sleep(0)
                    continue
                timeout -= SPIN_S
            if not reading:
                time.sleep(timeout or 0)
                continue
            try:
                readable, _, _ = select.select([self.source], [], [], timeout)
                if not readable:
                    continue
                data, arrived = self._receive()
            except (OSError, ValueError):
                data, arrived = b"", time.monotonic()
                self.closed.set()  # a reset or error on either side closes both
            # An end of stream is queued too, so it is delayed like data.
            queue.append((arrived + self.delay_s, data))
            reading = bool(data)

    def _receive(self) -> tuple[bytes, float]:
        """A chunk, and when it arrived on the monotonic clock: the kernel's time of its
        (last) arrival where the socket is stamped, else now."""
        if not self.stamped:
            return self.source.recv(CHUNK), time.monotonic()
        data, ancillary, _, _ = self.source.recvmsg(CHUNK, socket.CMSG_SPACE(_TIMESPEC.size))
        now, wall = time.monotonic(), time.time()
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack(payload[:_TIMESPEC.size])
                age = wall - (seconds + nanoseconds / 1e9)
                return data, now - min(max(age, 0.0), self.delay_s)
        return data, now

    def _send(self, data: bytes) -> bool:
        """Pass a chunk on (an empty one: the half-close); False once the stream ends."""
        try:
            if not data:
                self.sink.shutdown(socket.SHUT_WR)
                return False
            self.sink.sendall(data)
            return True
        except OSError:
            self.closed.set()
            return False


class DelayProxy:
    """Forward connections to ``target``, each chunk ``delay_s`` late in each direction."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError("the delay cannot be negative")
        self.target = target
        self.delay_s = delay_s

    def serve(self, listener: socket.socket) -> None:
        """Accept clients for ever, one thread to look after each."""
        while True:
            client, _ = listener.accept()
            # The stopping signals go to this thread alone: a signal the kernel gave a
            # forwarding thread would leave this one asleep in accept().
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                threading.Thread(target=self._client, args=(client,), daemon=True).start()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _client(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        closed = threading.Event()
        directions = [_Direction(client, upstream, self.delay_s, closed),
                      _Direction(upstream, client, self.delay_s, closed)]
        # Both directions end (each passes its end of stream on), or an error ends both.
        while not closed.wait(0.5):
            if not any(d.thread.is_alive() for d in directions):
                break
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.delayproxy",
        description="A TCP proxy on 127.0.0.1 that delays every chunk by --delay-ms in each "
                    "direction, in order, without limiting throughput (the bench's "
                    "database 'D ms away').")
    p.add_argument("--target", type=parse_target, required=True, metavar="HOST:PORT",
                   help="where to forward each connection")
    p.add_argument("--delay-ms", type=non_negative_float, default=1.0, metavar="MS",
                   help="delay of every chunk, each way, in milliseconds (default 1; 0 "
                        "forwards at once)")
    p.add_argument("--port", type=non_negative_int, default=0,
                   help="port to listen on, on 127.0.0.1 (default 0: a free one)")
    return p


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM ends it as Ctrl-C does


def _tight_timers() -> None:
    """Ask Linux to wake this process's timers on time: its default timer slack lets a
    sleep run 50 us long, each way (threads made later inherit this)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # 1 ns; Linux only, else a no-op


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _tight_timers()
    listener = socket.create_server(("127.0.0.1", args.port))
    # Linux switches receive stamps on for the whole system lazily (by deferred work) when
    # the first socket asks: asking now, before any client, stamps their first chunks.
    with contextlib.suppress(OSError):
        listener.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    port = listener.getsockname()[1]
    print(f"delayproxy: {args.delay_ms:g} ms each way to {args.target[0]}:{args.target[1]}, "
          f"listening on tcp://127.0.0.1:{port}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt), listener:
        DelayProxy(args.target, args.delay_ms / 1000).serve(listener)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
