"""Slow and greedy clients cannot starve the others: --request-timeout and
--max-connections-per-client, against a real service process."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing

import pytest

from tests.conftest import poll, service_process

# Another loopback address than the service's clients usually come from: a second client.
OTHER_CLIENT = "127.0.0.2"
THIRD_CLIENT = "127.0.0.3"
# An address nothing but the test uses: the start-up readiness probe connects from
# 127.0.0.1, and its connection may still count until the server has seen it close.
FRESH_CLIENT = "127.0.0.4"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))


def ask_from(url: str, source: str, timeout: float, method: str = "POST",
             path: str = "/buy") -> tuple[int, dict[str, object]]:
    """One request from a socket bound to ``source`` (POST /buy unless told); status and
    JSON body."""
    client = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=timeout,
                                        source_address=(source, 0))
    try:
        client.request(method, path, body=b"", headers={"Content-Length": "0"})
        answer = client.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        client.close()


def read_until_closed(sock: socket.socket, trickle: bytes, limit_s: float) -> bytes:
    """Send ``trickle`` every 0.2 s and read whatever comes, until the server closes the
    connection (then what it sent) or ``limit_s`` passes (then AssertionError)."""
    sock.settimeout(0.2)  # the pace of the trickle
    received = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # closed: what it sent is still to be read
            sock.sendall(trickle)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the connection was still open after {limit_s} s "
                         f"(received {received!r})")


class Trickler:
    """One client address opening many connections and trickling a header byte into each,
    now and then, for as long as the test runs (bounded)."""

    def __init__(self, port: int, connections: int) -> None:
        self.port = port
        self.wanted = connections
        self.sockets: list[socket.socket] = []
        self.opened = threading.Event()
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="trickler")
        self._thread.start()

    def _run(self) -> None:
        try:
            for _ in range(self.wanted):
                try:
                    # Past the server's connection limit, connections wait in its backlog.
                    sock = connect(self.port, timeout=0.5)
                except OSError:
                    continue
                try:
                    sock.sendall(b"P")
                except OSError:
                    sock.close()
                    continue
                self.sockets.append(sock)
            self.opened.set()
            # A byte a second into each: well inside the idle timeout, so every connection
            # stays active. Bounded: 60 rounds at most.
            for _ in range(60):
                if self.stop.wait(1.0):
                    break
                for sock in list(self.sockets):
                    try:
                        sock.send(b"O")
                    except OSError:  # closed by the server: refused or timed out
                        self.sockets.remove(sock)
                        sock.close()
        except BaseException as error:  # handed to the test by close()
            self.failures.append(error)
            self.opened.set()
        finally:
            for sock in self.sockets:
                sock.close()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the trickler did not stop"
        assert not self.failures, self.failures


@pytest.fixture
def trickler() -> Iterator[list[Trickler]]:
    made: list[Trickler] = []
    yield made
    for each in made:
        each.close()


def test_a_trickling_crowd_from_one_address_does_not_lock_out_a_buyer(
        trickler: list[Trickler]) -> None:
    """With the defaults, one address opens more connections than --connection-limit and
    trickles bytes into all of them; a buyer from another address is still served."""
    with service_process("--tickets", "10", "--access-log", "off") as service:
        crowd = Trickler(port_of(service.url), 1_100)  # --connection-limit is 1000
        trickler.append(crowd)
        assert crowd.opened.wait(timeout=60), "the crowd did not get its connections"
        # The crowd's connections wait in the kernel's accept queue, first in first out,
        # until the server takes them in; a request from a third address, queued behind
        # them, is answered once it has (without the limits: never, as the crowd then holds
        # every slot).
        assert ask_from(service.url, THIRD_CLIENT, timeout=30, method="GET",
                        path="/remaining")[0] == 200
        # 2 s: the behaviour asked for (a buyer answered within 2 s while the crowd holds
        # on), not a speed target.
        status, body = ask_from(service.url, OTHER_CLIENT, timeout=2.0)
        assert (status, body) == (200, {"tickets": [{"serial": 1}], "remaining": 9})


@pytest.mark.parametrize(("sent", "trickle", "answer"), [
    (b"POST /buy HTTP/1.1\r\nHost: booth\r\n", b"X", "408 request_timeout"),
    (b"POST /buy HTTP/1.1\r\nContent-Length: 100\r\n\r\n{", b" ", "408 request_timeout"),
    (b"PO", b"S", "none"),
], ids=["headers", "body", "request-line"])
def test_a_request_that_trickles_in_is_cut_off(sent: bytes, trickle: bytes,
                                               answer: str) -> None:
    """Each trickled byte is activity, so the idle timeout never ends it: the request
    deadline, counted from its first byte, does."""
    with service_process("--request-timeout", "1", "--access-log", "off") as service:
        with closing(connect(port_of(service.url))) as sock:
            sock.sendall(sent)
            # Bounded well past the 1 s deadline (plus the sweep); the point is that it ends.
            received = read_until_closed(sock, trickle, limit_s=15)
        if answer == "none":
            assert received == b""
        else:
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 ")
            assert json.loads(body)["error"] == "request_timeout"
        # The service goes on serving.
        assert ask_from(service.url, "127.0.0.1", timeout=10)[0] == 200


def test_past_the_per_client_limit_a_connection_is_told_why() -> None:
    with service_process("--max-connections-per-client", "2", "--access-log", "off",
                         "--tickets", "10") as service, ExitStack() as held:
        port = port_of(service.url)
        first, second = (held.enter_context(closing(connect(port, FRESH_CLIENT)))
                         for _ in range(2))
        for sock in (first, second):  # each is served: a request answered on it
            sock.sendall(b"GET /remaining HTTP/1.1\r\nHost: booth\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        status, body = ask_from(service.url, FRESH_CLIENT, timeout=10)
        assert status == 429 and body["error"] == "too_many_connections"
        assert "--max-connections-per-client" in str(body["message"])
        # Another address has slots of its own.
        assert ask_from(service.url, OTHER_CLIENT, timeout=10)[0] == 200
        # A closed connection gives its slot back (once the server has seen it close).
        first.close()
        poll(lambda: ask_from(service.url, FRESH_CLIENT, timeout=10)[0] == 200,
             "a slot given back")


def test_the_per_client_limit_can_be_turned_off() -> None:
    with service_process("--max-connections-per-client", "0", "--access-log", "off",
                         "--connection-limit", "20") as service, ExitStack() as held:
        port = port_of(service.url)
        for _ in range(15):
            sock = held.enter_context(closing(connect(port)))
            sock.sendall(b"GET /remaining HTTP/1.1\r\nHost: booth\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
