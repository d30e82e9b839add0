"""Fixtures for the load generator's tests: real services on 127.0.0.1, port 0."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from loadtest.spawn import spawned_service


@pytest.fixture(scope="module")
def big_service() -> Iterator[str]:
    """A real service with a stock no test here sells out; tests share it one at a time
    (the checks compare before and after, so earlier sales do not matter)."""
    with spawned_service(tickets=1_000_000, store="memory") as url:
        yield url


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback URL where nothing listens: the port is bound (so nobody else can take it)
    but not listening, so connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
