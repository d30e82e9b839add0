"""A smoke of ``make bench``: the bench runs end to end and writes every figure.

``python -m bench --smoke`` makes one 1-second measurement of the Flask hello and
of memory ``/buy``. Nothing here asserts a time, a rate or a ratio: the bench is a report,
and this machine is shared. It needs wrk (``make test`` installs it); without wrk this
test fails with that reason rather than skipping.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.load import Run, run_wrk, write_wrk_script
from bench.procs import detect_pinning
from bench.report import PER_SALE, CheckSpec, Measured, evaluate, format_markdown
from bench.runner import CHECKS, MEASUREMENTS, SERVERS, SMOKE, ServerSpec, _server_command, run
from loadtest.booths import PURCHASE_CONTENT_TYPE, purchase_body

ROOT = Path(__file__).resolve().parent.parent
CPU_FIELDS = {"server_cpu", "load_cpu", "db_cpu", "proxy_cpu", "service_us_per_sale",
              "db_us_per_sale"}
RUN_FIELDS = {"tool", "requests", "seconds", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms",
              "errors", "non_2xx", "foreign_cpu", "retries", "tickets_per_commit", *CPU_FIELDS}
MEASUREMENT_FIELDS = {"name", "title", "tool", "repetitions", "median_rps", "min_rps",
                      "max_rps", "p50_ms", "p99_ms", "foreign_cpu_max", "noisy", "remarks",
                      "runs", "discarded_runs", "tickets_per_commit", *CPU_FIELDS}


@pytest.mark.timeout(180)
def test_bench_smoke_writes_every_figure(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: `make test` installs it from Debian's packages "
                    "(apt-get install wrk)", pytrace=False)
    out = tmp_path / "bench"
    # bench/ is not installed: it runs from the repository's root, as `make bench` runs it.
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memory /buy vs Flask hello" in done.stdout

    result = json.loads((out / "bench.json").read_text())
    assert result["config"]["smoke"] is True
    assert {"pinned", "pinning", "wrk", "loadavg_before", "loadavg_after"} <= set(
        result["machine"])
    measurements = {m["name"]: m for m in result["measurements"]}
    assert set(measurements) == set(SMOKE)
    for m in measurements.values():
        assert set(m) >= MEASUREMENT_FIELDS, m
        assert m["repetitions"] == 1 and len(m["runs"]) == 1
        assert m["median_rps"] > 0
        assert set(m["runs"][0]) >= RUN_FIELDS
        assert m["runs"][0]["tool"] == "wrk"
        assert m["db_cpu"] is None and m["db_us_per_sale"] is None  # no PostgreSQL here
        assert m["tickets_per_commit"] is None
    assert measurements["memory"]["service_us_per_sale"] > 0
    assert measurements["flask-hello"]["service_us_per_sale"] is None  # a hello sells nothing
    checks = {c["name"]: c for c in result["checks"]}
    assert set(checks) == {c.name for c in CHECKS}
    ratio = checks["memory-vs-flask"]
    assert ratio["value"] > 0 and ratio["target"] == 0.95
    assert ratio["verdict"] in ("PASS", "MISS")
    assert checks["sqlite-vs-memory"]["verdict"] == "n/a"  # not measured in a smoke
    assert (out / "bench.md").read_text().startswith("Made by `python -m bench --smoke")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "work").exists()  # scratch files are removed


@pytest.mark.timeout(120)
def test_closed_and_open_loops_have_their_own_repetitions_and_durations(
        tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: `make test` installs it", pytrace=False)
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "bench", "--only", "p99-memory", "--repeat",
                           "2", "--duration", "1", "--open-repeat", "1", "--open-duration",
                           "2", "--warmup", "0", "--noise-redos", "0", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert (result["config"]["repeat"], result["config"]["duration_s"]) == (2, 1)
    assert (result["config"]["open_repeat"], result["config"]["open_duration_s"]) == (1, 2)
    runs = {m["name"]: m["runs"] for m in result["measurements"]}
    assert len(runs["memory"]) == 2 and len(runs["p99-memory"]) == 1
    # Each run's length by the tool's own clock: the open loop ran the longer.
    assert max(r["seconds"] for r in runs["memory"]) < runs["p99-memory"][0]["seconds"]
    assert runs["p99-memory"][0]["seconds"] >= 1.5, runs["p99-memory"]
    assert re.search(r"\| 2 x \d s \|", (out / "bench.md").read_text())


def test_bench_usage_errors_exit_2() -> None:
    assert run(["--connections", "63"]) == 2
    assert run(["--only", "no-such-measurement"]) == 2
    assert run(["--repeat", "0"]) == 2
    assert run(["--open-repeat", "0"]) == 2
    assert run(["--open-duration", "0"]) == 2


def _measured(name: str, *rps: float, p99: float = 1.0) -> Measured:
    runs = [Run("wrk", requests=int(r), seconds=1.0, rps=r, p50_ms=1.0, p90_ms=1.0,
                p99_ms=p99, max_ms=1.0) for r in rps]
    return Measured(name, name, "wrk", runs=runs)


def test_ratios_are_ratios_of_medians_with_verdicts() -> None:
    measured = {"a": _measured("a", 90, 100, 200), "b": _measured("b", 130, 110, 120),
                "p": _measured("p", 1, 1, 1, p99=12.0)}
    specs = [CheckSpec("pass", "a/b", "a", "b", 0.8), CheckSpec("miss", "a/b", "a", "b", 0.9),
             CheckSpec("report", "b/a", "b", "a"), CheckSpec("na", "a/x", "a", "x", 0.8),
             CheckSpec("p99-miss", "p99 of p", "p", target=10.0),
             CheckSpec("p99-pass", "p99 of p", "p", target=15.0)]
    checks = {c.spec.name: c for c in evaluate(specs, measured)}
    assert checks["pass"].value == pytest.approx(100 / 120)  # medians 100 and 120
    assert checks["pass"].verdict == "PASS" and checks["miss"].verdict == "MISS"
    assert checks["report"].verdict == "report"
    assert checks["report"].value == pytest.approx(1.2)
    assert checks["na"].verdict == "n/a" and checks["na"].value is None
    assert checks["p99-miss"].verdict == "MISS" and checks["p99-miss"].value == 12.0
    assert checks["p99-pass"].verdict == "PASS"


def test_every_check_compares_measurements_that_exist() -> None:
    names = {m.name for m in MEASUREMENTS}
    for check in CHECKS:
        assert check.numerator in names, check
        assert check.denominator is None or check.denominator in names, check
        assert check.floor is None or check.floor in names, check
    for m in MEASUREMENTS:
        assert set(m.servers) <= set(SERVERS), m


def test_only_postgresql_is_reached_through_the_delay_proxy() -> None:
    proxied = {n: s for n, s in SERVERS.items() if s.delay_ms is not None}
    assert {s.delay_ms for s in proxied.values()} == {0.0, 1.0}
    assert all(s.on_postgres for s in proxied.values())


def test_a_server_behind_the_proxy_reaches_its_database_on_the_proxys_port(
        tmp_path: Path) -> None:
    databases = {"postgres:3": "postgresql://postgres@127.0.0.1:5432/tb_3"}
    proxies = {1.0: 6001, 0.0: 6000}

    def store(spec: ServerSpec) -> str:
        command = _server_command(spec, tmp_path, databases, proxies)
        return command[command.index("--store") + 1]

    assert store(ServerSpec("service", "postgres:3")) == databases["postgres:3"]
    assert store(ServerSpec("service", "postgres:3", delay_ms=1.0)) == (
        "postgresql://postgres@127.0.0.1:6001/tb_3")
    assert store(ServerSpec("service", "postgres:3", delay_ms=0.0)) == (
        "postgresql://postgres@127.0.0.1:6000/tb_3")


def test_cpu_per_sale_is_the_median_of_the_runs_service_then_database() -> None:
    pg, sqlite, sold_out = _measured("pg", 1, 2, 3), _measured("sq", 1, 2), _measured("so", 1)
    for one, service, db in zip(pg.runs, (300.0, 400.0, 365.0), (40.0, 30.0, 34.0),
                                strict=True):
        one.service_us_per_sale, one.db_us_per_sale = service, db
    for one, service in zip(sqlite.runs, (80.0, 98.0), strict=True):
        one.service_us_per_sale = service
    table = format_markdown([pg, sqlite, sold_out], []).splitlines()
    assert PER_SALE in table[0]
    column = table[0].split(" | ").index(PER_SALE)
    assert [row.split(" | ")[column] for row in table[2:5]] == ["365/34", "89", "-"]
    assert pg.as_json()["db_us_per_sale"] == 34.0 and sold_out.as_json()[
        "service_us_per_sale"] is None


def test_tickets_per_commit_is_the_median_of_the_runs_and_shown_in_the_notes() -> None:
    pg, memory = _measured("pg", 1, 2, 3), _measured("memory", 1, 2)
    for one, tickets in zip(pg.runs, (44.0, 27.5, 41.0), strict=True):
        one.tickets_per_commit = tickets
    assert pg.tickets_per_commit == 41.0 and pg.as_json()["tickets_per_commit"] == 41.0
    assert "41.0 tickets per commit" in pg.remarks()
    assert memory.tickets_per_commit is None and "per commit" not in memory.remarks()


def test_wrk_script_spreads_threads_over_ports(tmp_path: Path) -> None:
    script = write_wrk_script(tmp_path / "s.lua", [8001, 8002], keyed=True).read_text()
    assert "local ports = {8001, 8002}" in script
    assert "local keyed = true" in script
    assert "%%" not in script


@pytest.mark.timeout(60)
def test_wrk_as_booths_sends_the_request_a_booth_sends(tmp_path: Path) -> None:
    """The generator comparison is fair only if wrk sends what ticketbooth-load sends."""
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: `make test` installs it", pytrace=False)
    seen: list[tuple[str, str | None, bytes]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            seen.append((self.path, self.headers.get("Content-Type"), self.rfile.read(length)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder) as recorder:
        threading.Thread(target=recorder.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{recorder.server_address[1]}"
            plain = run_wrk([url], duration=1, connections=2, pinning=detect_pinning(False),
                            script_dir=tmp_path)
            as_booths = run_wrk([url], duration=1, connections=2,
                                pinning=detect_pinning(False), script_dir=tmp_path,
                                as_booths=True)
        finally:
            recorder.shutdown()
    assert plain.requests > 0 and as_booths.requests > 0
    assert ("/buy", None, b"") in seen  # the plain run: an empty POST
    assert ("/buy", PURCHASE_CONTENT_TYPE, purchase_body(1)) in seen
    assert set(seen) == {("/buy", None, b""),
                                         ("/buy", PURCHASE_CONTENT_TYPE, purchase_body(1))}


def test_an_open_loop_that_fell_behind_its_rate_is_no_verdict() -> None:
    held, behind = _measured("held", 995, p99=3.0), _measured("behind", 970, p99=3.0)
    held.runs[0].rate = behind.runs[0].rate = 1000.0
    specs = [CheckSpec("held", "p99", "held", target=10.0),
             CheckSpec("behind", "p99", "behind", target=10.0)]
    checks = {c.spec.name: c for c in evaluate(specs, {"held": held, "behind": behind})}
    assert checks["held"].verdict == "PASS"
    assert checks["behind"].verdict == "n/a"
    assert "could not send 1,000 req/s" in checks["behind"].note


@pytest.mark.parametrize(("server", "load_core", "load", "noise"), [
    (0.0, 0.0, 0.2, 0.0),
    (0.3, 0.0, 0.2, 0.3),  # others on the servers' CPU always count
    (0.0, 0.6, 0.2, 0.0),  # a neighbour on the load CPU that left wrk all it wanted
    (0.0, 0.3, 0.9, 0.3),  # ... and one that competed with a busy generator
])
def test_noise_counts_others_where_they_competed(server: float, load_core: float, load: float,
                                                 noise: float) -> None:
    one = _measured("m", 100).runs[0]
    one.foreign_cpu, one.foreign_load_cpu, one.load_cpu = server, load_core, load
    assert one.noise == pytest.approx(noise)


def test_the_noisiest_runs_are_replaced_whatever_their_figures() -> None:
    m = _measured("m", 100, 200, 300)
    for one, noise in zip(m.runs, (0.0, 0.5, 0.0), strict=True):
        one.foreign_cpu = noise
    quiet = _measured("q", 10).runs[0]
    quiet.foreign_cpu = 0.05
    m.offer(quiet, keep=3)
    assert [r.rps for r in m.runs] == [100, 300, 10]  # the noisy 200 goes, though it is mid
    assert [r.rps for r in m.discarded] == [200]
    assert m.noisy is False  # 0.05 is under the 0.1 limit
    louder = _measured("l", 1000).runs[0]
    louder.foreign_cpu = 0.9
    m.offer(louder, keep=3)
    assert [r.rps for r in m.discarded] == [200, 1000]
