"""Idempotency-Key over HTTP, on every store: replay, reuse, in flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from tests.conftest import Threads


def buy(url: str, key: str, quantity: int = 1) -> requests.Response:
    return requests.post(f"{url}/buy", json={"quantity": quantity},
                         headers={"Idempotency-Key": key}, timeout=10)


def test_retry_replays_the_first_answer(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=10) as url:
        first = buy(url, "a-1", 2)
        again = buy(url, "a-1", 2)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() == {"tickets": [{"serial": 1}, {"serial": 2}],
                                                 "remaining": 8}
        assert "Idempotent-Replayed" not in first.headers
        assert again.headers["Idempotent-Replayed"] == "true"
        assert requests.get(f"{url}/remaining", timeout=5).json()["sold"] == 2


def test_sold_out_answer_is_replayed_too(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=1) as url:
        first = buy(url, "b-1", 3)
        again = buy(url, "b-1", 3)
        assert first.status_code == again.status_code == 409
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"


def test_same_key_for_another_request_is_422(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=10) as url:
        assert buy(url, "c-1", 1).status_code == 200
        reuse = buy(url, "c-1", 2)
        assert reuse.status_code == 422
        assert reuse.json()["error"] == "idempotency_key_reuse"
        assert requests.get(f"{url}/remaining", timeout=5).json()["sold"] == 1


def test_concurrent_requests_with_one_key_sell_once(live_server: Callable[..., Any]) -> None:
    # The chore keeps the first request in flight (1 s); the test asks again with the same
    # key until the service says so (a readiness poll), so no timing decides what is tested.
    with live_server(tickets=10, chore_ms=1_000) as url:
        first: list[requests.Response] = []
        answered = threading.Event()

        def client() -> None:
            first.append(buy(url, "d-1"))
            answered.set()

        background = Threads(client, 1, indexed=False)
        in_flight: list[requests.Response] = []
        others: list[requests.Response] = []
        deadline = time.monotonic() + 10
        while not in_flight and not answered.is_set() and time.monotonic() < deadline:
            answer = buy(url, "d-1")
            if answer.status_code == 409:
                in_flight.append(answer)
            else:  # this one came first: the background request is then the one in flight
                others.append(answer)
        background.join(timeout=30)
        answers = [*first, *in_flight, *others]
        sold = [a for a in answers if a.status_code == 200]
        busy = [a for a in answers if a.status_code == 409]
        assert len(sold) == 1 and len(busy) == 1, [(a.status_code, a.text) for a in answers]
        assert busy[0].json()["error"] == "idempotency_key_in_flight"
        assert "Idempotent-Replayed" not in sold[0].headers
        assert requests.get(f"{url}/remaining", timeout=5).json()["sold"] == 1
        later = buy(url, "d-1")
        assert later.json() == sold[0].json()
        assert later.headers["Idempotent-Replayed"] == "true"
