"""The load generator against real services: runs that pass, a store that oversells, thresholds,
the open loop, the plot, and ``make demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest.checks import CHECK_NAMES
from loadtest.cli import run
from loadtest.demo import demo
from loadtest.spawn import spawned_service
from tests.conftest import service_process

#: The top-level fields of the JSON result, as documented in the README.
JSON_FIELDS = {
    "version", "started_at", "config", "interrupted", "elapsed_s", "requests", "throughput_rps",
    "tickets_acknowledged", "tickets_unknown", "sold_out_responses", "status_counts", "errors",
    "error_rate", "latency_ms", "booths", "remaining_before", "remaining_after", "checks",
    "thresholds", "timeseries", "stages", "lateness", "faults", "exit_status",
}


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_default_scenario_sells_out_and_passes_every_check(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out = tmp_path / "result.json"
    assert run(["--spawn", "--json", str(out)]) == 0

    text = capsys.readouterr().out
    assert "10 booths, closed loop, quantity 1, until sold out" in text
    assert text.count("PASS  ") == 4
    assert text.rstrip().endswith("PASS: all 4 checks passed")
    assert "\r" not in text  # no progress bar when stdout is not a terminal

    data = _load(out)
    assert set(data) == JSON_FIELDS
    assert data["exit_status"] == 0
    assert data["config"]["spawn"] == {"tickets": 100, "store": "memory", "server_args": []}
    assert data["config"]["booths"] == 10 and data["config"]["mode"] == "closed"
    assert data["tickets_acknowledged"] == 100
    assert data["tickets_unknown"] == 0
    assert data["status_counts"]["200"] == 100
    assert data["status_counts"]["409"] == data["sold_out_responses"] == 10  # each booth once
    assert data["requests"] == 110
    assert data["errors"] == {"refused": 0, "timeout": 0, "reset": 0, "5xx": 0, "other": 0}
    assert data["error_rate"] == 0
    assert data["remaining_before"] == {"remaining": 100, "sold": 0, "held": 0, "total": 100}
    assert data["remaining_after"] == {"remaining": 0, "sold": 100, "held": 0, "total": 100}
    assert [c["name"] for c in data["checks"]] == list(CHECK_NAMES)
    assert all(c["passed"] for c in data["checks"])
    assert set(data["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert 0 < data["latency_ms"]["p50"] <= data["latency_ms"]["p99"] <= data["latency_ms"]["max"]
    assert data["throughput_rps"] > 0
    assert len(data["booths"]) == 10
    assert sum(b["tickets"] for b in data["booths"]) == 100
    assert sum(row["requests"] for row in data["timeseries"]) == 110


def test_unsafe_store_is_caught_every_time(capsys: pytest.CaptureFixture[str]) -> None:
    """A 20 ms chore between reading and writing the counter, with 10 booths always
    waiting on 8 server threads: concurrent buyers always read the same count."""
    status = run(["--spawn", "--store", "unsafe-memory", "--tickets", "30",
                  "--server-arg=--chore-ms=20", "--quiet"])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL  no-duplicate-serials" in out
    assert "FAIL  sales-accounted" in out
    assert "checks failed: no-duplicate-serials, sales-accounted" in out


def test_json_to_stdout_keeps_the_report_on_stderr(big_service: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--url", big_service, "--requests", "200", "--quantity", "3", "--booths", "4",
                "--json", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["requests"] == 200
    assert data["tickets_acknowledged"] == 600
    assert data["remaining_after"]["sold"] - data["remaining_before"]["sold"] == 600
    assert "PASS: all 4 checks passed" in captured.err


def test_duration_and_plot(big_service: str, tmp_path: Path) -> None:
    plot, out = tmp_path / "run.png", tmp_path / "run.json"
    assert run(["--url", big_service, "--duration", "1.5", "--booths", "3", "--think", "2",
                "--plot", str(plot), "--json", str(out), "--quiet"]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000
    data = _load(out)
    # It ran for the whole duration (when it stops after is no concern of this test), and
    # bought all along: the timeseries has a second of requests for each second run.
    assert data["elapsed_s"] >= 1.5
    assert data["sold_out_responses"] == 0
    assert len(data["timeseries"]) >= 2
    assert all(row["requests"] > 0 for row in data["timeseries"][:2])


def test_open_loop_keeps_its_rate(big_service: str, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    assert run(["--url", big_service, "--rate", "200", "--requests", "100", "--booths", "5",
                "--json", str(out), "--quiet"]) == 0
    data = _load(out)
    assert data["config"]["mode"] == "open"
    assert data["requests"] == 100
    assert [b["requests"] for b in data["booths"]] == [20] * 5
    # 100 requests due at 200/s: the last is due at 0.495 s, so an open loop that keeps its
    # schedule cannot be done before (one that sent as fast as it could would be).
    assert data["elapsed_s"] >= 0.49


def test_thresholds_exit_3(big_service: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--url", big_service, "--requests", "20", "--booths", "2",
                "--max-p99-ms", "0.001", "--max-error-rate", "0"]) == 3
    out = capsys.readouterr().out
    assert "FAIL  max-p99-ms" in out
    assert "PASS  max-error-rate" in out
    assert "all 4 checks passed but thresholds breached: max-p99-ms" in out


def test_booths_spread_round_robin_over_urls(tmp_path: Path) -> None:
    """Booths go round-robin over the URLs, and the checks cover the serials from all of
    them. (Several instances on one stock need PostgreSQL: see tests/test_postgres*.py.)"""
    out = tmp_path / "run.json"
    with spawned_service(tickets=100, store="memory") as first:
        second = first.replace("127.0.0.1", "localhost")
        assert run(["--url", first, "--url", second, "--booths", "4", "--json", str(out),
                    "--quiet"]) == 0
    data = _load(out)
    assert [b["url"] for b in data["booths"]] == [first, second, first, second]
    assert data["errors"] == {"refused": 0, "timeout": 0, "reset": 0, "5xx": 0, "other": 0}, data
    assert data["tickets_acknowledged"] == 100
    assert data["remaining_after"] == {"remaining": 0, "sold": 100, "held": 0, "total": 100}


def test_spawned_service_that_cannot_start_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--spawn", "--store", "no-such-store"]) == 2
    err = capsys.readouterr().err
    assert "ticketbooth-load: error: the spawned service exited with status 2" in err


def test_make_demo_tells_the_stores_apart(capsys: pytest.CaptureFixture[str]) -> None:
    # The fault scenarios shortened (and their sales slowed, so that check 5 has fewer
    # serials to look up); what they must tell apart is the same.
    assert demo(fault_run=("--duration", "4", "--fault-every", "1", "--booths", "4",
                           "--rate", "300")) == 0
    out = capsys.readouterr().out
    assert "demo: OK" in out
    assert out.count("as expected") == 4


@pytest.mark.parametrize(
    "extra",
    [pytest.param(["--requests", "101"], id="closed-budget-split"),
     pytest.param(["--requests", "60", "--rate", "300"], id="open-loop-global-slots")],
)
def test_processes_share_the_booths(big_service: str, tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "run.json"
    assert run(["--url", big_service, "--processes", "2", "--booths", "5", *extra,
                "--json", str(out), "--quiet"]) == 0
    data = _load(out)
    assert data["config"]["processes"] == 2
    assert [b["booth"] for b in data["booths"]] == [1, 2, 3, 4, 5]
    assert data["requests"] == int(extra[1])
    assert data["tickets_acknowledged"] == data["requests"]
    assert all(c["passed"] for c in data["checks"])


def test_a_run_refused_past_the_per_client_limit_says_which_setting_to_change(
        capsys: pytest.CaptureFixture[str]) -> None:
    with service_process("--max-connections-per-client", "2", "--tickets", "1000",
                         "--access-log", "off") as service:
        run(["--url", service.url, "--booths", "6", "--requests", "60", "--quiet"])
    out = capsys.readouterr().out
    assert "429 too_many_connections" in out
    assert "--max-connections-per-client 0" in out


def test_spawn_starts_its_service_without_the_per_client_limit(tmp_path: Path) -> None:
    """Six booths from one address, past the per-client limit a connection limit of 8
    would otherwise mean (half of it): every one is served."""
    out = tmp_path / "run.json"
    assert run(["--spawn", "--server-arg=--connection-limit=8", "--booths", "6",
                "--json", str(out), "--quiet"]) == 0
    data = _load(out)
    assert data["status_counts"] == {"200": 100, "409": 6}
    assert data["error_rate"] == 0
