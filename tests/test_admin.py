"""The admin API: bearer token, restock atomic with sales in flight, sales figures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.conftest import FakeClock, Threads

TOKEN = "correct horse battery staple"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_without_a_token_the_admin_endpoints_do_not_exist(live_server: Callable[..., Any]
                                                           ) -> None:
    with live_server(tickets=5) as url:
        for method, path in (("POST", "/admin/restock"), ("GET", "/admin/stats")):
            answer = requests.request(method, url + path, headers=AUTH, json={"tickets": 5},
                                      timeout=5)
            assert answer.status_code == 404
            assert answer.json()["error"] == "not_found"
        assert requests.get(f"{url}/remaining", timeout=5).json()["total"] == 5


@pytest.mark.parametrize(("headers", "challenge"), [
    ({}, 'Bearer realm="ticketbooth"'),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, 'Bearer realm="ticketbooth"'),
    ({"Authorization": "Bearer"}, 'Bearer realm="ticketbooth"'),
    ({"Authorization": "Bearer wrong"}, 'Bearer realm="ticketbooth", error="invalid_token"'),
    ({"Authorization": f"Bearer {TOKEN}x"},
     'Bearer realm="ticketbooth", error="invalid_token"'),
], ids=["missing", "basic", "empty", "wrong", "longer"])
def test_missing_or_wrong_token_is_401(live_server: Callable[..., Any],
                                       headers: dict[str, str], challenge: str) -> None:
    with live_server(tickets=5, admin_token=TOKEN) as url:
        for method, path in (("POST", "/admin/restock"), ("GET", "/admin/stats")):
            answer = requests.request(method, url + path, headers=headers,
                                      json={"tickets": 5}, timeout=5)
            assert answer.status_code == 401
            assert answer.json()["error"] == "unauthorized"
            assert answer.headers["WWW-Authenticate"] == challenge
        assert requests.get(f"{url}/remaining", timeout=5).json()["total"] == 5


@pytest.mark.parametrize(("body", "status", "code"), [
    ({}, 400, "invalid_tickets"),
    ({"tickets": 0}, 400, "invalid_tickets"),
    ({"tickets": -4}, 400, "invalid_tickets"),
    ({"tickets": 2.5}, 400, "invalid_tickets"),
    ({"tickets": "7"}, 400, "invalid_tickets"),
    ({"tickets": True}, 400, "invalid_tickets"),
    ({"tickets": 10**10}, 400, "invalid_tickets"),
    ({"tickets": 3, "serial": 1}, 400, "invalid_body"),
    ([3], 400, "invalid_body"),
])
def test_bad_restock_is_refused_and_changes_nothing(live_server: Callable[..., Any],
                                                    body: object, status: int, code: str
                                                    ) -> None:
    with live_server(tickets=5, admin_token=TOKEN) as url:
        answer = requests.post(f"{url}/admin/restock", headers=AUTH, json=body, timeout=5)
        assert (answer.status_code, answer.json()["error"]) == (status, code)
        assert requests.get(f"{url}/remaining", timeout=5).json()["total"] == 5


def test_restock_is_atomic_with_sales_in_flight(live_server: Callable[..., Any]) -> None:
    """Buyers buy while restocks land; every ticket of the grown stock is sold once."""
    stock, restocks, added = 200, 10, 30
    buyers = 16
    serials: list[list[int]] = [[] for _ in range(buyers)]
    restocked = threading.Event()
    # The sales figures' clock stands still (at the start): every sale is in "the last
    # minute", however long this takes.
    with live_server(tickets=stock, admin_token=TOKEN,
                     app_clock=FakeClock(time.time())) as url:

        def buyer(index: int) -> None:
            with requests.Session() as session:
                for _ in range(10_000):  # bounded: stops at sold out after the restocks
                    answer = session.post(f"{url}/buy", json={"quantity": 2}, timeout=30)
                    if answer.status_code == 409:
                        if restocked.is_set() and answer.json()["remaining"] < 2:
                            return
                        continue
                    assert answer.status_code == 200, answer.text
                    serials[index].extend(t["serial"] for t in answer.json()["tickets"])

        threads = Threads(buyer, buyers)
        with requests.Session() as admin:
            for _ in range(restocks):
                answer = admin.post(f"{url}/admin/restock", headers=AUTH,
                                    json={"tickets": added}, timeout=30)
                assert answer.status_code == 200
                assert answer.json()["added"] == added
        restocked.set()
        threads.join(timeout=120)
        counts = requests.get(f"{url}/remaining", timeout=5).json()
        stats = requests.get(f"{url}/admin/stats", headers=AUTH, timeout=5).json()

    total = stock + restocks * added
    sold = sorted(s for booth in serials for s in booth)
    assert counts == {"remaining": 0, "sold": total, "held": 0, "total": total}
    assert sold == list(range(1, total + 1)), "a ticket was lost, duplicated or oversold"
    assert stats["total"] == stats["sold"] == stats["sold_by_this_instance"] == total
    assert stats["sold_last_minute"] == total
    assert stats["remaining"] == 0 and stats["uptime_s"] > 0
