"""The holds API over a real waitress server on 127.0.0.1, port 0, on every store."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
import requests

from app.inventory import new_hold_id
from tests.conftest import poll
from tests.test_telemetry import scrape

TIMEOUT = 10


def counts(url: str) -> dict[str, int]:
    response = requests.get(f"{url}/remaining", timeout=TIMEOUT)
    assert response.status_code == 200
    return response.json()


def create(url: str, body: Any = None, key: str | None = None) -> requests.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return requests.post(f"{url}/holds", json=body, headers=headers, timeout=TIMEOUT)


def test_hold_then_confirm(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=10) as url:
        requests.post(f"{url}/buy", timeout=TIMEOUT)
        made = create(url, {"quantity": 3, "ttl_s": 60})
        assert made.status_code == 201, made.text
        hold = made.json()
        assert hold["quantity"] == 3 and hold["state"] == "held"
        assert made.headers["Location"] == f"/holds/{hold['id']}"
        assert "Idempotent-Replayed" not in made.headers
        expires = datetime.fromisoformat(hold["expires_at"].replace("Z", "+00:00"))
        assert 50 < expires.timestamp() - time.time() <= 61
        assert counts(url) == {"remaining": 6, "sold": 1, "held": 3, "total": 10}
        assert requests.get(f"{url}/holds/{hold['id']}", timeout=TIMEOUT).json() == hold

        confirmed = requests.post(f"{url}/holds/{hold['id']}/confirm", timeout=TIMEOUT)
        assert confirmed.status_code == 200
        sale = {"tickets": [{"serial": serial} for serial in (2, 3, 4)], "remaining": 6}
        assert confirmed.json() == sale and "Idempotent-Replayed" not in confirmed.headers
        again = requests.post(f"{url}/holds/{hold['id']}/confirm", timeout=TIMEOUT)
        assert again.status_code == 200 and again.json() == sale
        assert again.headers["Idempotent-Replayed"] == "true"
        refused = requests.delete(f"{url}/holds/{hold['id']}", timeout=TIMEOUT)
        assert refused.status_code == 409 and refused.json()["error"] == "hold_confirmed"
        shown = requests.get(f"{url}/holds/{hold['id']}", timeout=TIMEOUT).json()
        assert shown == {**hold, "state": "confirmed", "tickets": sale["tickets"]}
        assert counts(url) == {"remaining": 6, "sold": 4, "held": 0, "total": 10}


def test_hold_then_release(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=5) as url:
        hold = create(url, {"quantity": 5}).json()
        full = create(url, {"quantity": 1})
        assert full.status_code == 409
        assert full.json()["error"] == "sold_out" and full.json()["remaining"] == 0
        assert requests.post(f"{url}/buy", timeout=TIMEOUT).status_code == 409
        for _ in range(2):  # a release is idempotent
            released = requests.delete(f"{url}/holds/{hold['id']}", timeout=TIMEOUT)
            assert released.status_code == 204 and released.content == b""
        refused = requests.post(f"{url}/holds/{hold['id']}/confirm", timeout=TIMEOUT)
        assert refused.status_code == 409 and refused.json()["error"] == "hold_released"
        assert requests.get(f"{url}/holds/{hold['id']}",
                            timeout=TIMEOUT).json()["state"] == "released"
        assert counts(url) == {"remaining": 5, "sold": 0, "held": 0, "total": 5}


def test_a_hold_expires_by_the_servers_clock(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=5) as url:
        hold = create(url, {"quantity": 2, "ttl_s": 1}).json()
        poll(lambda: requests.get(f"{url}/holds/{hold['id']}",
                                  timeout=TIMEOUT).json()["state"] == "expired",
             "the hold to expire", 15)
        assert counts(url)["held"] == 0
        expired = requests.post(f"{url}/holds/{hold['id']}/confirm", timeout=TIMEOUT)
        assert expired.status_code == 410 and expired.json()["error"] == "hold_expired"
        assert requests.delete(f"{url}/holds/{hold['id']}", timeout=TIMEOUT).status_code == 204
        assert counts(url) == {"remaining": 5, "sold": 0, "held": 0, "total": 5}


def test_keys_are_one_namespace_across_buy_and_holds(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=10) as url:
        first = create(url, {"quantity": 2}, key="hold-key")
        again = create(url, {"quantity": 2}, key="hold-key")
        assert (first.status_code, again.status_code) == (201, 201)
        assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Location"] == first.headers["Location"]
        crossed = requests.post(f"{url}/buy", json={"quantity": 2},
                                headers={"Idempotency-Key": "hold-key"}, timeout=TIMEOUT)
        assert crossed.status_code == 422
        assert crossed.json()["error"] == "idempotency_key_reuse"
        requests.post(f"{url}/buy", headers={"Idempotency-Key": "buy-key"}, timeout=TIMEOUT)
        crossed = create(url, {"quantity": 1}, key="buy-key")
        assert crossed.status_code == 422
        assert crossed.json()["error"] == "idempotency_key_reuse"
        assert counts(url) == {"remaining": 7, "sold": 1, "held": 2, "total": 10}


# (request body or raw (content type, bytes), status, error code): nothing is held.
BAD_HOLDS = [
    ({"quantity": 0}, 400, "invalid_quantity"),
    ({"quantity": 11}, 400, "invalid_quantity"),
    ({"quantity": -1}, 400, "invalid_quantity"),
    ({"quantity": "2"}, 400, "invalid_quantity"),
    ({"quantity": True}, 400, "invalid_quantity"),
    ({"quantity": 2.0}, 400, "invalid_quantity"),
    ({"quantity": None}, 400, "invalid_quantity"),
    ({"ttl_s": 0}, 400, "invalid_ttl"),
    ({"ttl_s": 3601}, 400, "invalid_ttl"),
    ({"ttl_s": -5}, 400, "invalid_ttl"),
    ({"ttl_s": 1.5}, 400, "invalid_ttl"),
    ({"ttl_s": "60"}, 400, "invalid_ttl"),
    ({"ttl_s": 10**30}, 400, "invalid_ttl"),
    ({"quantity": 1, "colour": "red"}, 400, "invalid_body"),
    ([1], 400, "invalid_body"),
    (("application/json", b"{not json"), 400, "invalid_json"),
    (("text/plain", b"quantity=1"), 415, "unsupported_media_type"),
    (("application/json", b"{" + b" " * 2000 + b"}"), 413, "payload_too_large"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_HOLDS,
                         ids=[f"{row[2]}-{i}" for i, row in enumerate(BAD_HOLDS)])
@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_bad_holds_are_refused_and_hold_nothing(live_server: Callable[..., Any], body: Any,
                                                status: int, code: str) -> None:
    with live_server(tickets=10) as url:
        if isinstance(body, tuple):
            answer = requests.post(f"{url}/holds", data=body[1],
                                   headers={"Content-Type": body[0]}, timeout=TIMEOUT)
        else:
            answer = create(url, body)
        assert answer.status_code == status, answer.text
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.json()["error"] == code
        assert counts(url) == {"remaining": 10, "sold": 0, "held": 0, "total": 10}


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_a_bad_idempotency_key_is_refused(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=10) as url:
        answer = create(url, {"quantity": 1}, key="k" * 256)
        assert answer.status_code == 400
        assert answer.json()["error"] == "invalid_idempotency_key"
        assert counts(url)["held"] == 0


# Ids that name no hold: well-formed but unknown, too short, too long, odd characters.
UNKNOWN_IDS = [new_hold_id(), "abc", "A" * 21, "A" * 23, "A" * 21 + "!", "%00" * 8,
               "1" * 200]


@pytest.mark.parametrize("hold_id", UNKNOWN_IDS)
@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_unknown_and_malformed_ids_are_404_on_every_route(live_server: Callable[..., Any],
                                                          hold_id: str) -> None:
    with live_server(tickets=10) as url:
        live = create(url, {"quantity": 1}).json()
        for method, path in (("GET", f"/holds/{hold_id}"), ("DELETE", f"/holds/{hold_id}"),
                             ("POST", f"/holds/{hold_id}/confirm")):
            answer = requests.request(method, f"{url}{path}", timeout=TIMEOUT)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"] == "not_found"
        assert counts(url) == {"remaining": 9, "sold": 0, "held": 1, "total": 10}
        assert requests.get(f"{url}/holds/{live['id']}", timeout=TIMEOUT).json() == live


@pytest.mark.parametrize("store_kind", ["memory"])
def test_wrong_methods_are_405(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=10) as url:
        hold = create(url).json()
        for method, path in (("GET", "/holds"), ("PUT", f"/holds/{hold['id']}"),
                             ("GET", f"/holds/{hold['id']}/confirm")):
            answer = requests.request(method, f"{url}{path}", timeout=TIMEOUT)
            assert answer.status_code == 405, (method, path)
            assert answer.json()["error"] == "method_not_allowed"
        assert counts(url)["held"] == 1


def test_metrics_and_stats_count_holds_by_outcome(live_server: Callable[..., Any]) -> None:
    token = "stats-token"
    with live_server(tickets=20, admin_token=token) as url:
        confirmed = create(url, {"quantity": 2}, key="c").json()
        create(url, {"quantity": 2}, key="c")  # a replay creates nothing
        released = create(url, {"quantity": 3}).json()
        create(url, {"quantity": 4})  # still held at the end
        expiring = create(url, {"quantity": 5, "ttl_s": 1}).json()
        for _ in range(2):  # the second of each changes nothing
            requests.post(f"{url}/holds/{confirmed['id']}/confirm", timeout=TIMEOUT)
            requests.delete(f"{url}/holds/{released['id']}", timeout=TIMEOUT)
        # The expired hold is counted once cleaned up, in the background.
        poll(lambda: scrape(url)[("ticketbooth_holds_total", (("outcome", "expired"),))] == 1,
             "the expiry to be counted", 15)
        metrics = scrape(url)
        stats = requests.get(f"{url}/admin/stats", timeout=TIMEOUT,
                             headers={"Authorization": f"Bearer {token}"}).json()
        assert requests.get(f"{url}/holds/{expiring['id']}",
                            timeout=TIMEOUT).json()["state"] == "expired"
    outcomes = {"created": 4, "confirmed": 1, "released": 1, "expired": 1}
    for outcome, count in outcomes.items():
        assert metrics[("ticketbooth_holds_total", (("outcome", outcome),))] == count
    assert metrics[("ticketbooth_tickets_held", ())] == 4
    assert metrics[("ticketbooth_tickets_sold_total", ())] == 2
    assert metrics[("ticketbooth_tickets_remaining", ())] == 20 - 2 - 4
    assert stats["holds_by_this_instance"] == outcomes
    assert (stats["held"], stats["sold"], stats["remaining"]) == (4, 2, 14)
