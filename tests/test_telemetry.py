"""Metrics, the access log, and connection limits."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from app.telemetry import AccessLog, SalesRate
from tests.conftest import FakeClock, run_threads, service_process


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = requests.get(f"{url}/metrics", timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples}


def test_metrics_count_sales_requests_and_replays(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=10) as url:
        requests.post(f"{url}/buy", json={"quantity": 3}, timeout=5)
        requests.post(f"{url}/buy?quantity=2", headers={"Idempotency-Key": "k"}, timeout=5)
        requests.post(f"{url}/buy?quantity=2", headers={"Idempotency-Key": "k"}, timeout=5)
        requests.post(f"{url}/buy", json={"quantity": 9}, timeout=5)  # 409
        requests.get(f"{url}/tickets/1", timeout=5)
        requests.get(f"{url}/nowhere/at/all", timeout=5)
        metrics = scrape(url)

    def requests_of(endpoint: str, status: str, method: str = "POST") -> float:
        key = (("endpoint", endpoint), ("method", method), ("status", status))
        return metrics.get(("ticketbooth_http_requests_total", key), 0)

    assert metrics[("ticketbooth_tickets_sold_total", ())] == 5
    assert metrics[("ticketbooth_tickets_remaining", ())] == 5
    assert metrics[("ticketbooth_tickets_stock", ())] == 10
    assert metrics[("ticketbooth_idempotent_replays_total", ())] == 1
    assert metrics[("ticketbooth_store_errors_total", ())] == 0
    assert requests_of("/buy", "200") == 3
    assert requests_of("/buy", "409") == 1
    assert requests_of("/tickets/{serial}", "200", "GET") == 1
    assert requests_of("other", "404", "GET") == 1
    count = metrics[("ticketbooth_http_request_duration_seconds_count",
                     (("endpoint", "/buy"),))]
    assert count == 4


def buy_from_threads(url: str, clients: int, each: int) -> None:
    """``clients`` threads, each buying one ticket ``each`` times on its own session."""

    def client() -> None:
        with requests.Session() as session:
            for _ in range(each):
                assert session.post(f"{url}/buy", timeout=30).status_code == 200

    run_threads(client, clients, indexed=False)


def test_metrics_are_exact_under_many_threads(live_server: Callable[..., Any]) -> None:
    clients, each = 16, 25
    with live_server(tickets=10_000, threads=8) as url:
        buy_from_threads(url, clients, each)
        metrics = scrape(url)
    assert metrics[("ticketbooth_tickets_sold_total", ())] == clients * each
    key = (("endpoint", "/buy"), ("method", "POST"), ("status", "200"))
    assert metrics[("ticketbooth_http_requests_total", key)] == clients * each


def test_metrics_count_the_group_commits_batches_and_their_orders(
        live_server: Callable[..., Any], store_kind: str) -> None:
    clients, each = 8, 5
    with live_server(tickets=1000, threads=8) as url:
        buy_from_threads(url, clients, each)
        metrics = scrape(url)
    names = {"ticketbooth_commit_batches_total", "ticketbooth_commit_orders_total",
             "ticketbooth_commit_batches_pipelined_total"}
    if store_kind == "memory":  # no group commit: every sale is its own step in memory
        assert not names & {name for name, _ in metrics}
        return
    batches = metrics[("ticketbooth_commit_batches_total", ())]
    assert metrics[("ticketbooth_commit_orders_total", ())] == clients * each
    assert 1 <= batches <= clients * each
    # Pipelining needs a full window of slow trips first: fewer batches never pipeline.
    assert metrics[("ticketbooth_commit_batches_pipelined_total", ())] == 0


def test_sales_rate_covers_the_last_minute_only() -> None:
    clock = FakeClock()
    rate = SalesRate(clock)
    rate.add(3)
    clock.advance(30)
    rate.add(2)
    assert rate.last_minute() == 5
    clock.advance(31)
    assert rate.last_minute() == 2
    clock.advance(60)
    assert rate.last_minute() == 0


@pytest.mark.parametrize("form", ["plain", "json", "off"])
def test_access_log_has_one_line_per_request(form: str, tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("w") as file, service_process("--access-log", form, stderr=file) as service:
        url = service.url
        requests.post(f"{url}/buy?quantity=2", headers={"Idempotency-Key": "a"}, timeout=5)
        requests.post(f"{url}/buy?quantity=2", headers={"Idempotency-Key": "a"}, timeout=5)
        requests.get(f"{url}/nowhere", timeout=5)
        assert service.stop() == 0
    stderr = log.read_text()
    lines = [line for line in stderr.splitlines() if "/buy" in line or "/nowhere" in line]
    if form == "off":
        assert lines == []
        return
    assert len(lines) == 3, stderr
    if form == "json":
        records = [json.loads(line) for line in lines]
        assert [(r["method"], r["path"], r["status"], r["replayed"]) for r in records] == [
            ("POST", "/buy?quantity=2", 200, False), ("POST", "/buy?quantity=2", 200, True),
            ("GET", "/nowhere", 404, False)]
        assert all(r["duration_ms"] >= 0 and r["remote"] == "127.0.0.1" for r in records)
    else:
        assert '"POST /buy?quantity=2" 200' in lines[0] and "replayed" not in lines[0]
        assert lines[1].endswith(" replayed")
        assert '"GET /nowhere" 404' in lines[2] and lines[2].endswith("ms")


def test_log_level_warning_hides_info(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("w") as file, service_process("--log-level", "warning",
                                                stderr=file) as service:
        requests.get(f"{service.url}/healthz", timeout=5)
        assert service.stop() == 0
    stderr = log.read_text()
    assert "/healthz" not in stderr and "stopped" not in stderr


def test_a_server_that_logs_a_lot_through_the_harness_still_answers() -> None:
    """The harness reads the service's stderr as it comes: a pipe nobody reads fills up
    (64 KiB on Linux) and then blocks the server's next log write, and every request."""
    padding = "x" * 2_000  # each access line holds the path: ~2 KB a line, ~600 KB in all
    with service_process() as service, requests.Session() as session:
        for index in range(300):
            answer = session.get(f"{service.url}/nowhere/{index}/{padding}", timeout=10)
            assert answer.status_code == 404
        assert session.get(f"{service.url}/remaining", timeout=10).status_code == 200


def test_a_log_that_cannot_be_written_changes_no_answer() -> None:
    """The reader of the service's stderr goes away (a log shipper restarts, ``| head``):
    every request is still answered as it would be, a committed sale as sold."""
    reader, writer = os.pipe()
    try:
        with service_process("--tickets", "5", stderr=writer) as service:
            os.close(writer)
            writer = -1
            os.close(reader)  # from now on, every write to its stderr fails (EPIPE)
            reader = -1
            sale = requests.post(f"{service.url}/buy", json={"quantity": 2}, timeout=10)
            assert (sale.status_code, sale.json()) == (
                200, {"tickets": [{"serial": 1}, {"serial": 2}], "remaining": 3})
            assert requests.get(f"{service.url}/remaining", timeout=10).json() == {
                "remaining": 3, "sold": 2, "held": 0, "total": 5}
            assert requests.get(f"{service.url}/tickets/2", timeout=10).status_code == 200
            metrics = scrape(service.url)
            # Four lines so far (the scrape's own comes after it is answered).
            assert metrics[("ticketbooth_log_lines_dropped_total", ())] >= 3
            assert service.stop() == 0
    finally:
        for fd in (reader, writer):
            if fd >= 0:
                os.close(fd)


def test_dropped_access_lines_are_counted_and_owned_up_to_once_writing_works() -> None:
    registry = CollectorRegistry()
    dropped = Counter("dropped", "test", registry=registry)
    first_reader, first_writer = os.pipe()
    fd = os.dup(first_writer)  # the log's descriptor; pointed at another pipe below
    os.close(first_writer)
    os.close(first_reader)
    second_reader, second_writer = os.pipe()
    try:
        access_log = AccessLog(fd, dropped)
        access_log.write("lost one")
        access_log.write("lost two")
        assert registry.get_sample_value("dropped_total") == 2
        os.dup2(second_writer, fd)  # writing works again
        access_log.write("kept")
        access_log.write("kept too")
        assert os.read(second_reader, 65536).decode().splitlines() == [
            "ticketbooth: 2 access log lines could not be written and were dropped",
            "kept", "kept too"]
        assert registry.get_sample_value("dropped_total") == 2
    finally:
        for each in (fd, second_reader, second_writer):
            os.close(each)


def idle_connections(url: str, count: int, stack: ExitStack) -> None:
    host, port = url.removeprefix("http://").split(":")
    for _ in range(count):
        stack.enter_context(socket.create_connection((host, int(port)), timeout=5))


def test_buy_answers_with_many_idle_connections_open(live_server: Callable[..., Any]) -> None:
    with live_server(tickets=5) as url, ExitStack() as stack:
        idle_connections(url, 300, stack)
        assert requests.post(f"{url}/buy", timeout=10).status_code == 200


def test_idle_connections_past_the_limit_are_reclaimed(live_server: Callable[..., Any]
                                                       ) -> None:
    # No per-client limit: every connection here comes from one address, and what is
    # tested is the total limit (tests/test_slow_clients.py tests the other).
    with live_server(tickets=5, connection_limit=20, channel_timeout=1,
                     max_connections_per_client=0) as url, \
            ExitStack() as stack:
        idle_connections(url, 40, stack)
        # Past the limit, new connections wait until idle ones time out and are closed.
        assert requests.post(f"{url}/buy", timeout=15).status_code == 200
