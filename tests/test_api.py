"""The HTTP API over a real waitress server on 127.0.0.1, port 0."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import requests

from app.settings import Settings
from app.stores import open_store
from tests.conftest import run_threads, serving

JSON = {"Content-Type": "application/json"}


def remaining(url: str) -> dict[str, int]:
    response = requests.get(f"{url}/remaining", timeout=5)
    assert response.status_code == 200
    return response.json()


def test_buy_one_then_three(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=10) as url:
        one = requests.post(f"{url}/buy", timeout=5)
        assert one.status_code == 200
        assert one.headers["Content-Type"] == "application/json"
        assert one.json() == {"tickets": [{"serial": 1}], "remaining": 9}
        three = requests.post(f"{url}/buy", json={"quantity": 3}, timeout=5)
        assert three.json() == {"tickets": [{"serial": s} for s in (2, 3, 4)], "remaining": 6}
        by_query = requests.post(f"{url}/buy?quantity=2", timeout=5)
        assert by_query.json() == {"tickets": [{"serial": 5}, {"serial": 6}], "remaining": 4}
        assert remaining(url) == {"remaining": 4, "sold": 6, "held": 0, "total": 10}


def test_sold_out_is_409_and_sells_nothing(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=2) as url:
        response = requests.post(f"{url}/buy", json={"quantity": 3}, timeout=5)
        assert response.status_code == 409
        body = response.json()
        assert body["error"] == "sold_out" and body["remaining"] == 2
        assert "2" in body["message"]
        assert remaining(url) == {"remaining": 2, "sold": 0, "held": 0, "total": 2}


def test_healthz_and_ticket_lookup(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=5) as url:
        assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
        requests.post(f"{url}/buy", json={"quantity": 2}, timeout=5)
        ticket = requests.get(f"{url}/tickets/2", timeout=5)
        assert ticket.status_code == 200
        assert ticket.json()["serial"] == 2
        assert ticket.json()["sold_at"].endswith("Z")


def test_ticket_lookup_past_every_serial_is_404(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=5) as url:
        requests.post(f"{url}/buy", json={"quantity": 5}, timeout=5)
        for serial in (6, 2**63, 10**30):  # past a database's bigint too
            response = requests.get(f"{url}/tickets/{serial}", timeout=5)
            assert response.status_code == 404, response.text
            assert response.json()["error"] == "not_found"


def test_64_clients_sell_exactly_the_stock(live_server: Callable[..., Any]) -> None:
    stock, clients = 300, 64
    start = threading.Barrier(clients)
    serials: list[list[int]] = [[] for _ in range(clients)]
    statuses: list[list[int]] = [[] for _ in range(clients)]

    with live_server(tickets=stock, threads=8) as url:

        def client(index: int) -> None:
            with requests.Session() as session:
                start.wait()
                for _ in range(stock + 1):  # bounded; ends at the first sold-out answer
                    response = session.post(f"{url}/buy", timeout=30)
                    statuses[index].append(response.status_code)
                    if response.status_code != 200:
                        assert response.status_code == 409
                        assert response.json()["error"] == "sold_out"
                        return
                    serials[index].extend(t["serial"] for t in response.json()["tickets"])

        run_threads(client, clients)
        after = remaining(url)

    sold = [serial for booth in serials for serial in booth]
    assert sorted(sold) == list(range(1, stock + 1)), "oversold, duplicated or lost"
    assert sum(s.count(200) for s in statuses) == stock
    assert all(s[-1] == 409 for s in statuses), "every client ends on a sold-out answer"
    assert after == {"remaining": 0, "sold": stock, "held": 0, "total": stock}


BIG = "x" * 2000
# (method, path, extra request kwargs, expected status, expected error code)
MALFORMED = [
    pytest.param("POST", "/buy", {"json": {"quantity": "2"}}, 400, "invalid_quantity",
                 id="string"),
    pytest.param("POST", "/buy", {"json": {"quantity": 1.5}}, 400, "invalid_quantity",
                 id="float"),
    pytest.param("POST", "/buy", {"json": {"quantity": 2.0}}, 400, "invalid_quantity",
                 id="integral-float"),
    pytest.param("POST", "/buy", {"json": {"quantity": True}}, 400, "invalid_quantity",
                 id="boolean"),
    pytest.param("POST", "/buy", {"json": {"quantity": None}}, 400, "invalid_quantity",
                 id="null"),
    pytest.param("POST", "/buy", {"json": {"quantity": [1]}}, 400, "invalid_quantity",
                 id="list"),
    pytest.param("POST", "/buy", {"json": {"quantity": 0}}, 400, "invalid_quantity", id="zero"),
    pytest.param("POST", "/buy", {"json": {"quantity": -3}}, 400, "invalid_quantity",
                 id="negative"),
    pytest.param("POST", "/buy", {"json": {"quantity": 11}}, 400, "invalid_quantity",
                 id="over-cap"),
    pytest.param("POST", "/buy", {"json": {"quantity": 10**40}}, 400, "invalid_quantity",
                 id="huge"),
    pytest.param("POST", "/buy?quantity=abc", {}, 400, "invalid_quantity", id="query-string"),
    pytest.param("POST", "/buy?quantity=1.5", {}, 400, "invalid_quantity", id="query-float"),
    pytest.param("POST", "/buy?quantity=0", {}, 400, "invalid_quantity", id="query-zero"),
    pytest.param("POST", "/buy?quantity=-1", {}, 400, "invalid_quantity", id="query-negative"),
    pytest.param("POST", "/buy?quantity=", {}, 400, "invalid_quantity", id="query-empty"),
    pytest.param("POST", "/buy?quantity=1_0", {}, 400, "invalid_quantity",
                 id="query-underscore"),
    pytest.param("POST", "/buy?quantity=1&quantity=2", {}, 400, "invalid_quantity",
                 id="query-twice"),
    pytest.param("POST", "/buy?quantity=1", {"json": {"quantity": 1}}, 400,
                 "invalid_quantity", id="query-and-body"),
    pytest.param("POST", "/buy", {"data": "{", "headers": JSON}, 400, "invalid_json",
                 id="broken-json"),
    pytest.param("POST", "/buy", {"data": b"\xff\xfe", "headers": JSON}, 400, "invalid_json",
                 id="not-utf8"),
    pytest.param("POST", "/buy", {"json": [1]}, 400, "invalid_body", id="json-array"),
    pytest.param("POST", "/buy", {"json": 3}, 400, "invalid_body", id="json-number"),
    pytest.param("POST", "/buy", {"json": {"qty": 1}}, 400, "invalid_body",
                 id="unknown-field"),
    pytest.param("POST", "/buy", {"data": "quantity=1"}, 415, "unsupported_media_type",
                 id="form-body"),
    pytest.param("POST", "/buy", {"data": '{"quantity": 1}', "headers":
                                  {"Content-Type": "text/plain"}}, 415,
                 "unsupported_media_type", id="text-plain"),
    pytest.param("POST", "/buy", {"data": '{"quantity": 1, "pad": "' + BIG + '"}',
                                  "headers": JSON}, 413, "payload_too_large", id="too-large"),
    pytest.param("GET", "/buy", {}, 405, "method_not_allowed", id="get-buy"),
    pytest.param("POST", "/remaining", {}, 405, "method_not_allowed", id="post-remaining"),
    pytest.param("DELETE", "/healthz", {}, 405, "method_not_allowed", id="delete-healthz"),
    pytest.param("GET", "/nowhere", {}, 404, "not_found", id="unknown-path"),
    pytest.param("POST", "/buy/", {}, 404, "not_found", id="trailing-slash"),
    pytest.param("GET", "/tickets/abc", {}, 404, "not_found", id="serial-not-integer"),
    pytest.param("GET", "/tickets/-1", {}, 404, "not_found", id="serial-negative"),
    pytest.param("GET", "/tickets/0", {}, 404, "not_found", id="serial-zero"),
    pytest.param("GET", "/tickets/3", {}, 404, "not_found", id="serial-unsold"),
    pytest.param("GET", "/tickets/101", {}, 404, "not_found", id="serial-out-of-range"),
    pytest.param("POST", "/buy", {"headers": {"Idempotency-Key": ""}}, 400,
                 "invalid_idempotency_key", id="key-empty"),
    pytest.param("POST", "/buy", {"headers": {"Idempotency-Key": "k" * 256}}, 400,
                 "invalid_idempotency_key", id="key-too-long"),
    pytest.param("POST", "/buy", {"headers": {"Idempotency-Key": "tab\there"}}, 400,
                 "invalid_idempotency_key", id="key-control-char"),
    pytest.param("POST", "/buy", {"headers": {"Idempotency-Key": "caf\u00e9".encode()}}, 400,
                 "invalid_idempotency_key", id="key-not-ascii"),
]


@pytest.fixture(scope="module")
def one_server() -> Any:
    """One server for the whole malformed-request table (two tickets already sold)."""
    settings = Settings(tickets=100)
    store = open_store(settings)
    with serving(settings, store) as url:
        requests.post(f"{url}/buy", json={"quantity": 2}, timeout=5)
        yield url
    store.close()


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), MALFORMED)
def test_malformed_request_is_a_json_error_and_sells_nothing(
        one_server: str, method: str, path: str, kwargs: dict[str, Any], status: int,
        code: str) -> None:
    before = remaining(one_server)
    response = requests.request(method, one_server + path, timeout=5, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    if status == 405:
        assert response.headers["Allow"]
    assert remaining(one_server) == before
