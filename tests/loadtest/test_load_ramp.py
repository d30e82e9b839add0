"""``--stages`` against a real service: the schedule is followed, stage by stage, in one process
and split over two; ``--csv`` streams while the run goes; ``--html`` in a real Chromium."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from loadtest.cli import run
from loadtest.html_report import render_run
from loadtest.stages import Schedule, parse_stages
from loadtest.stats import TIMESERIES_COLUMNS
from tests.browser import ARTIFACTS

#: From 100/s: up to 300/s over 2 s (400 requests), 2 s at 300/s (600), down to 100/s (400).
STAGES = "2s:300,2s:300,2s:100"
SCHEDULED = [400, 600, 400]
TARGETS = [200.0, 300.0, 200.0]


def _stage_run(url: str, folder: Path, *extra: str) -> tuple[dict[str, Any], int, str]:
    out = folder / "ramp.json"
    status = run(["--url", url, "--stages", STAGES, "--start-rate", "100", "--json", str(out),
                  *extra])
    data: dict[str, Any] = json.loads(out.read_text())
    return data, status, str(out)


@pytest.fixture(scope="module")
def ramp(big_service: str, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[dict[str, Any], int, Path]:
    """One three-stage run with the default 100 booths, its CSV and HTML kept."""
    folder = tmp_path_factory.mktemp("ramp")
    data, status, _ = _stage_run(big_service, folder, "--csv", str(folder / "ramp.csv"),
                                 "--html", str(folder / "ramp.html"), "--quiet")
    return data, status, folder


def _assert_schedule_followed(data: dict[str, Any]) -> None:
    assert data["config"]["stages"] == [{"duration_s": 2.0, "target": 300.0},
                                        {"duration_s": 2.0, "target": 300.0},
                                        {"duration_s": 2.0, "target": 100.0}]
    assert data["config"]["start_rate"] == 100.0
    assert data["config"]["mode"] == "open"
    assert data["config"]["duration_s"] == 6.0
    stages = data["stages"]
    assert [s["scheduled"] for s in stages] == SCHEDULED
    assert [s["sent"] for s in stages] == SCHEDULED  # every scheduled request was sent
    assert [s["target_rps"] for s in stages] == TARGETS
    assert [(s["start_rate"], s["end_rate"]) for s in stages] == [(100, 300), (300, 300),
                                                                  (300, 100)]
    for s in stages:
        # A generous bound: it checks that the schedule is followed, not how fast the machine is.
        assert s["achieved_rps"] == pytest.approx(s["target_rps"], rel=0.2), s
        assert s["ok"] == s["sent"] and s["errors"] == 0
        assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p90"] <= s["latency_ms"]["p99"]
    assert data["requests"] == sum(SCHEDULED)
    assert data["lateness"]["sent"] == sum(SCHEDULED)
    assert 0 <= data["lateness"]["late"] <= sum(SCHEDULED)
    assert all(c["passed"] for c in data["checks"])


def test_three_stages_follow_the_schedule(ramp: tuple[dict[str, Any], int, Path]) -> None:
    data, status, _ = ramp
    assert status == 0
    assert data["config"]["booths"] == 100  # the default with --stages
    _assert_schedule_followed(data)
    last_due = Schedule(parse_stages(STAGES), start_rate=100).send_time(sum(SCHEDULED) - 1)
    assert last_due <= data["elapsed_s"] < 6.0 + 5.0


def _csv_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == TIMESERIES_COLUMNS
        return [{k: float(v) for k, v in row.items()} for row in reader]


def test_stages_split_over_processes(big_service: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data, status, _ = _stage_run(big_service, tmp_path, "--processes", "2", "--booths", "20",
                                 "--csv", str(tmp_path / "ramp.csv"))
    assert status == 0
    # The workers send their requests to the parent, which writes the CSV.
    assert _csv_rows(tmp_path / "ramp.csv") == data["timeseries"]
    assert data["config"]["processes"] == 2
    _assert_schedule_followed(data)
    # Booth b of 20 holds the slots b-1, b+19, ...: 1400 / 20 = 70 each.
    assert [b["requests"] for b in data["booths"]] == [70] * 20
    text = capsys.readouterr().out
    assert "20 booths in 2 processes, open loop, stages from 100/s: 2s:300,2s:300,2s:100" in text
    assert "stages (latency from intended send times; achieved from actual ones)" in text
    assert "100->300" in text and "300->100" in text


def test_csv_rows_match_the_json_timeseries(ramp: tuple[dict[str, Any], int, Path]) -> None:
    data, _, folder = ramp
    rows = _csv_rows(folder / "ramp.csv")
    assert rows == data["timeseries"]
    assert sum(r["requests"] for r in rows) == sum(SCHEDULED)


def test_csv_that_cannot_be_written_exits_2(big_service: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--url", big_service, "--requests", "5", "--csv", str(tmp_path)]) == 2
    assert (f"ticketbooth-load: error: cannot write {tmp_path}: Is a directory\n"
            in capsys.readouterr().err)


def test_csv_is_written_while_the_run_goes(tmp_path: Path) -> None:
    """Through ``python -m loadtest``: a second's row is in the file before the run has
    ended, not only when it ends."""
    path = tmp_path / "live.csv"
    proc = subprocess.Popen([sys.executable, "-m", "loadtest", "--spawn", "--tickets", "1000",
                             "--stages", "4s:40", "--booths", "4", "--csv", str(path),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rows_while_running: list[str] = []
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) >= 2:  # the header and the first second's row
                rows_while_running = lines
                break
            time.sleep(0.05)  # a readiness poll of the file, bounded by the deadline
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rows_while_running, "no row was written before the run ended"
    assert rows_while_running[0] == ",".join(TIMESERIES_COLUMNS)
    assert rows_while_running[1].startswith("0.0,")
    final = path.read_text().splitlines()
    assert final[: len(rows_while_running)] == rows_while_running
    # Seen before the later seconds were written: not all at once at the end of the run.
    assert len(rows_while_running) < len(final), final
    assert sum(int(line.split(",")[1]) for line in final[1:]) == 80  # 4 s from 0 to 40/s


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_html_report_in_chromium(ramp: tuple[dict[str, Any], int, Path], browser: Browser,
                                 scheme: str) -> None:
    """The report loads from the file alone, with no script error, and shows the verdicts."""
    _, _, folder = ramp
    url = (folder / "ramp.html").as_uri()
    context = browser.new_context(viewport={"width": 1000, "height": 900},
                                  color_scheme=scheme)  # type: ignore[arg-type]
    try:
        requested: list[str] = []
        errors: list[str] = []
        context.on("request", lambda request: requested.append(request.url))
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text)
                if message.type == "error" else None)
        page.goto(url)
        expect(page.locator("#verdict")).to_have_text("PASS: all 4 checks passed")
        verdicts = page.locator("td.badge")
        expect(verdicts).to_have_count(4)
        for i in range(4):
            expect(verdicts.nth(i)).to_have_text("PASS")
        expect(page.locator("svg.chart")).to_have_count(2)
        expect(page.locator("svg.chart polyline.s5")).to_have_count(1)  # the target rate
        expect(page.get_by_role("heading", name="Stages")).to_be_visible()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"load-report-{scheme}.png"), full_page=True)
        if scheme == "light":
            pdf = page.pdf(path=str(ARTIFACTS / "load-report.pdf"))  # the print styles
            assert pdf.startswith(b"%PDF")
        assert requested == [url], f"requests beyond the file: {requested}"
        assert not errors, errors
    finally:
        context.close()


def test_html_report_shows_a_failed_check(ramp: tuple[dict[str, Any], int, Path]) -> None:
    data = json.loads(json.dumps(ramp[0]))
    data["checks"][2] |= {"passed": False, "detail": "sold 101 + remaining 0 != total 100"}
    html = render_run(data)
    assert 'id="verdict">FAIL: 1 of 4 checks failed: stock-consistent</p>' in html
    assert html.count('<td class="badge fail">FAIL</td>') == 1
    assert html.count('<td class="badge pass">PASS</td>') == 3
    assert "sold 101 + remaining 0 != total 100" in html
    assert "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "").replace(data["config"]["urls"][0], "")


def test_html_report_marks_faults(ramp: tuple[dict[str, Any], int, Path]) -> None:
    """The faults of a --faults run (their JSON: 'faults' -> 'injected') as marks and a table."""
    data = json.loads(json.dumps(ramp[0]))
    data["faults"] = {"injected": [
        {"kind": "kill", "instance": 1, "at_s": 1.5, "healed_after_s": 0.42},
        {"kind": "pause", "instance": 2, "at_s": 3.25, "healed_after_s": None}]}
    html = render_run(data)
    assert html.count('class="s4 dash mark"') == 4  # two faults on each of the two charts
    assert "<title>kill instance 1</title>" in html and "<title>pause instance 2</title>" in html
    assert "<td>1.50</td><td class=\"text\">kill</td><td>1</td><td>0.42</td>" in html
    assert "<td>3.25</td><td class=\"text\">pause</td><td>2</td><td>never</td>" in html
