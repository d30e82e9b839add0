"""The bench's delay proxy (``bench/delayproxy.py``), run as the bench runs it: its own
process, between two sockets of this test on 127.0.0.1.

Its behaviour is a time: every chunk arrives no sooner than D after it was sent, and
chunks sent in a row are not held back one D after another. Both are asserted as bounds,
because those bounds are what the proxy is for.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import delay_proxy, poll

DELAY_S = 0.05
#: How long the proxy is stopped (SIGSTOP) while a chunk reaches it: longer than the delay.
STALL_S = 0.2
#: Chunks sent one after another, GAP_S apart (less than the delay, so several are on
#: their way at once).
CHUNKS = 10
GAP_S = 0.005


@contextmanager
def _linked(logs: Path) -> Iterator[tuple[socket.socket, socket.socket, int]]:
    """(client, upstream, the proxy's pid): a connection through a proxy delaying each way
    by DELAY_S."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]
        with (delay_proxy(f"127.0.0.1:{port}", DELAY_S * 1000, logs) as (proxy_port, pid),
              socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as client):
            upstream, _ = listener.accept()
            with upstream:
                upstream.settimeout(10)
                yield client, upstream, pid


@pytest.fixture
def link(tmp_path: Path) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, upstream): a connection through a proxy delaying each way by DELAY_S."""
    with _linked(tmp_path) as (client, upstream, _):
        yield client, upstream


def _send_paced(sender: socket.socket, receiver: socket.socket,
                chunks: list[bytes]) -> tuple[list[float], list[tuple[float, bytes]]]:
    """Send ``chunks`` GAP_S apart; answers when each was sent, and what arrived when."""
    total = sum(map(len, chunks))
    arrived: list[tuple[float, bytes]] = []

    def receive() -> None:
        got = 0
        while got < total:
            data = receiver.recv(1 << 16)
            if not data:
                return
            arrived.append((time.monotonic(), data))
            got += len(data)

    reader = threading.Thread(target=receive)
    reader.start()
    sent = []
    for chunk in chunks:
        sent.append(time.monotonic())
        sender.sendall(chunk)
        time.sleep(GAP_S)  # pacing, so that chunks travel separately: not synchronisation
    reader.join(timeout=30)
    assert not reader.is_alive()
    return sent, arrived


def _first_arrival(arrived: list[tuple[float, bytes]], offset: int) -> float:
    """When the byte at ``offset`` of the stream arrived."""
    seen = 0
    for when, data in arrived:
        seen += len(data)
        if seen > offset:
            return when
    raise AssertionError(f"byte {offset} never arrived")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("direction", ["to the server", "back to the client"])
def test_bytes_pass_unchanged_in_order_each_at_least_the_delay_late(
        link: tuple[socket.socket, socket.socket], direction: str) -> None:
    client, upstream = link
    sender, receiver = (client, upstream) if direction == "to the server" else (upstream,
                                                                               client)
    chunks = [os.urandom(size) for size in (1, 100, 5000, 200_000, 7, 64 * 1024, 3, 1,
                                            10_000, 42)]
    assert len(chunks) == CHUNKS
    sent, arrived = _send_paced(sender, receiver, chunks)
    assert b"".join(data for _, data in arrived) == b"".join(chunks)
    offset = 0
    for chunk, when in zip(chunks, sent, strict=True):
        # No byte arrives sooner than the delay after it was sent: the delay IS the proxy's
        # behaviour, so this bound on a time is what is tested.
        assert _first_arrival(arrived, offset) - when >= DELAY_S
        offset += len(chunk)
    # A generous upper bound that is the behaviour too: chunks are delayed side by side, not
    # one after another (a proxy that slept DELAY_S per chunk in turn would take at least
    # CHUNKS * DELAY_S for the last one; here it is about CHUNKS * GAP_S + DELAY_S).
    assert arrived[-1][0] - sent[0] < CHUNKS * DELAY_S


@pytest.mark.timeout(60)
def test_an_end_of_stream_is_passed_on_after_the_data(
        link: tuple[socket.socket, socket.socket]) -> None:
    client, upstream = link
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    received = b""
    while data := upstream.recv(1024):  # bounded: the socket times out after 10 s
        received += data
    assert received == b"last words"
    upstream.sendall(b"still heard")  # a half-close: the other way stays open
    upstream.close()
    answer = b""
    while data := client.recv(1024):
        answer += data
    assert answer == b"still heard"


@pytest.mark.timeout(60)
def test_the_delay_counts_from_the_arrival_not_from_when_the_proxy_reads(
        tmp_path: Path) -> None:
    """A proxy that is slow to wake (here: stopped outright) does not lengthen the delay:
    each chunk is due DELAY_S after the kernel received it, so a chunk that waited
    STALL_S (> DELAY_S) to be read is forwarded at once, not DELAY_S after that."""
    received, sent, arrived = _stalled_send(tmp_path)
    assert received == b"while it sleeps"
    # Bounds that are the behaviour: never sooner than the delay (it was stalled longer),
    # and well short of the stall plus the delay, which a proxy that stamps a chunk when
    # it reads it would take.
    assert STALL_S <= arrived - sent < STALL_S + DELAY_S * 0.8


def _stalled_send(logs: Path) -> tuple[bytes, float, float]:
    """Send a chunk through a proxy stopped for STALL_S; what arrived, when it was sent,
    and when it arrived."""
    with _linked(logs) as (client, upstream, pid):
        client.sendall(b"warm")  # the proxy's threads for this connection are up
        assert upstream.recv(16) == b"warm"
        os.kill(pid, signal.SIGSTOP)
        try:
            poll(lambda: _stopped(pid), "every thread of the proxy to stop")
            sent = time.monotonic()
            client.sendall(b"while it sleeps")
            time.sleep(STALL_S)  # the fault's length: the proxy stays stopped this long
        finally:
            os.kill(pid, signal.SIGCONT)
        received = b""
        while len(received) < len(b"while it sleeps"):
            received += upstream.recv(1024)
        return received, sent, time.monotonic()


def _stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state T in /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    return all((task / "stat").read_text().rpartition(")")[2].split()[0] == "T"
               for task in tasks.iterdir())
