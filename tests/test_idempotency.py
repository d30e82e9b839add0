"""Idempotency-Key over HTTP, on every store: replay, reuse, in flight."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import requests

from tests.conftest import run_threads


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
    # The chore keeps the first request in flight long enough for the second to arrive.
    with live_server(tickets=10, chore_ms=400) as url:
        start = threading.Barrier(2)
        answers: list[requests.Response] = []

        def client() -> None:
            start.wait()
            answers.append(buy(url, "d-1"))

        run_threads(client, 2, indexed=False, timeout=30)
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200, 409]
        busy = next(a for a in answers if a.status_code == 409)
        assert busy.json()["error"] == "idempotency_key_in_flight"
        sold = next(a for a in answers if a.status_code == 200)
        assert requests.get(f"{url}/remaining", timeout=5).json()["sold"] == 1
        later = buy(url, "d-1")
        assert later.json() == sold.json()
        assert later.headers["Idempotent-Replayed"] == "true"
