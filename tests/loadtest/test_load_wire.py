"""A booth drives its one connection directly: scripted servers on real sockets check that
it keeps the connection alive, reconnects after failures, closes and answers, and counts
each failure as the same kind ``requests`` would (and its tickets as unknown when the
request may have reached the server)."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
import requests

from loadtest.booths import LoadPlan, classify_exception, run_load
from loadtest.stats import BoothStats

#: One connection's script: it is handed the accepted socket and its index (0, 1, ...).
Script = Callable[[socket.socket, int], None]


class ScriptedServer:
    """Accepts connections one after another and runs a script on each, in order."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests = 0
        self.received: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            index = self.connections
            self.connections += 1
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    self.script(conn, index)

    def read_request(self, conn: socket.socket) -> bool:
        """Read one whole request (headers and Content-Length body); False at end of stream."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            body += chunk
        self.requests += 1
        self.received.append(head + b"\r\n\r\n" + body)
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a bare close() does not)
        self.sock.close()
        self._thread.join(10)


def answer(status: str, body: bytes, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def sale(serial: int) -> bytes:
    return answer("200 OK", json.dumps({"tickets": [{"serial": serial}], "remaining": 9}).encode())


def reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def make(script: Script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def one_booth(url: str, requests_: int, timeout: float = 2.0, think: float = 0.0) -> BoothStats:
    plan = LoadPlan(urls=(url,), booths=1, requests=requests_, timeout=timeout, think_s=think)
    [stats] = run_load(plan).booths
    assert stats.requests == requests_
    return stats


def errors(stats: BoothStats) -> dict[str, int]:
    return {kind: n for kind, n in stats.errors.items() if n}


def through_requests(url: str, timeout: float = 2.0) -> tuple[str, bool]:
    """How the same failure is classified when the request goes through ``requests``."""
    session = requests.Session()
    prepared = session.prepare_request(requests.Request("POST", url + "/buy", data=b"{}"))
    try:
        session.get_adapter(url).send(prepared, timeout=timeout).content  # noqa: B018
    except requests.RequestException as exc:
        return classify_exception(exc)
    finally:
        session.close()
    raise AssertionError("the request did not fail")


def test_keep_alive_one_connection_for_every_request(scripted: Callable[[Script], ScriptedServer]
                                                     ) -> None:
    def script(conn: socket.socket, index: int) -> None:
        serial = 0
        while server.read_request(conn):
            serial += 1
            conn.sendall(sale(serial))

    server = scripted(script)
    stats = one_booth(server.url, 20)
    assert server.connections == 1 and server.requests == 20
    assert stats.serials == list(range(1, 21)) and stats.tickets == 20
    assert stats.status_counts == {200: 20} and not errors(stats) and stats.unknown_tickets == 0


def test_the_request_on_the_wire(scripted: Callable[[Script], ScriptedServer]) -> None:
    def script(conn: socket.socket, index: int) -> None:
        if server.read_request(conn):
            conn.sendall(sale(1))

    server = scripted(script)
    one_booth(server.url + "/", 1)
    head, _, body = server.received[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /buy HTTP/1.1"
    port = server.url.rsplit(":", 1)[1]
    assert sorted(lines[1:]) == [b"Content-Length: 15", b"Content-Type: application/json",
                                 f"Host: 127.0.0.1:{port}".encode()]
    assert json.loads(body) == {"quantity": 1}


def test_refused_never_reached_the_server(dead_url: str) -> None:
    stats = one_booth(dead_url, 3)
    assert errors(stats) == {"refused": 3} and stats.unknown_tickets == 0
    assert through_requests(dead_url) == ("refused", False)


def test_read_timeout_may_have_sold_and_applies_per_request() -> None:
    with socket.socket() as s:  # listens but never accepts: no answer ever comes
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        stats = one_booth(url, 2, timeout=0.2)
        assert errors(stats) == {"timeout": 2} and stats.unknown_tickets == 2
        # Each request waited for its timeout (0.2 s, less a little for the granularity of
        # the clocks) before it was given up.
        assert all(lat >= 180_000 for lat in stats.latency_us)
        assert through_requests(url, timeout=0.2) == ("timeout", True)


@pytest.mark.parametrize(("name", "fault"), [
    ("reset", lambda conn: reset(conn)),
    ("closed without an answer", lambda conn: None),
    ("half an answer", lambda conn: conn.sendall(sale(1)[:-5])),
    ("not HTTP", lambda conn: conn.sendall(b"garbage\r\n\r\n")),
])
def test_broken_answers_are_resets_that_may_have_sold(
        scripted: Callable[[Script], ScriptedServer], name: str,
        fault: Callable[[socket.socket], None]) -> None:
    """The first connection breaks after reading the request; the booth reconnects and buys."""
    def script(conn: socket.socket, index: int) -> None:
        if not server.read_request(conn):
            return
        if index % 2 == 0:
            fault(conn)  # then the connection is closed
            return
        conn.sendall(sale(index))
        while server.read_request(conn):
            conn.sendall(sale(index))

    server = scripted(script)
    stats = one_booth(server.url, 3)
    assert errors(stats) == {"reset": 1}, name
    assert stats.unknown_tickets == 1 and stats.tickets == 2
    assert server.connections == 2
    assert through_requests(server.url) == ("reset", True)  # connection 2: broken again


def test_connection_close_and_idle_close_reconnect_without_errors(
        scripted: Callable[[Script], ScriptedServer]) -> None:
    def script(conn: socket.socket, index: int) -> None:
        if server.read_request(conn):  # one answer per connection, then closed
            conn.sendall(answer("200 OK", b'{"tickets":[{"serial":%d}]}' % index,
                                *(["Connection: close"] if index % 2 else [])))

    server = scripted(script)
    # The think time makes the booth idle, so it notices the connection the server
    # closed after its answer (without saying so) before sending on it.
    stats = one_booth(server.url, 4, think=0.2)
    assert not errors(stats) and stats.serials == [0, 1, 2, 3]
    assert server.connections == 4


def test_statuses_and_unreadable_sales(scripted: Callable[[Script], ScriptedServer]) -> None:
    answers = [
        answer("503 Service Unavailable", b'{"error":"unavailable"}'),
        answer("409 Conflict", b'{"error":"sold_out"}'),
        answer("200 OK", b"not json"),
        answer("400 Bad Request", b'{"error":"bad_request"}'),
        sale(7),
    ]

    def script(conn: socket.socket, index: int) -> None:
        for a in answers:
            if not server.read_request(conn):
                return
            conn.sendall(a)

    server = scripted(script)
    stats = one_booth(server.url, len(answers))
    assert stats.status_counts == {503: 1, 409: 1, 200: 2, 400: 1}
    assert errors(stats) == {"5xx": 1, "other": 2}
    assert stats.sold_out == 1 and stats.serials == [7]
    assert stats.unknown_tickets == 1  # the unreadable sale
    assert server.connections == 1
