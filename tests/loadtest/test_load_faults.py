"""How failed requests are classified, with real sockets that refuse, stall or reset."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
import requests

from loadtest.booths import classify_exception


def _failure(url: str, timeout: float = 2.0) -> BaseException:
    session = requests.Session()
    prepared = session.prepare_request(requests.Request("POST", url + "/buy", data=b"{}"))
    try:
        session.get_adapter(url).send(prepared, timeout=timeout).content  # noqa: B018
    except requests.RequestException as exc:
        return exc
    finally:
        session.close()
    raise AssertionError("the request did not fail")


@pytest.fixture
def stalled_url() -> Iterator[str]:
    """Listens but never accepts: the connection completes in the backlog, no answer comes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def resetting_url() -> Iterator[str]:
    """Accepts one connection, reads the request, and resets it (SO_LINGER 0)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    thread.join(10)
    server.close()


def test_refused_never_reached_the_server(dead_url: str) -> None:
    assert classify_exception(_failure(dead_url)) == ("refused", False)


def test_read_timeout_may_have_sold(stalled_url: str) -> None:
    assert classify_exception(_failure(stalled_url, timeout=0.2)) == ("timeout", True)


def test_reset_may_have_sold(resetting_url: str) -> None:
    assert classify_exception(_failure(resetting_url)) == ("reset", True)


def test_unrecognised_failure_is_other_and_may_have_sold() -> None:
    assert classify_exception(requests.RequestException("odd")) == ("other", True)
