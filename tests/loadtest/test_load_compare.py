"""``ticketbooth-load compare``: recorded JSON results side by side, the gates and their exits."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from loadtest.cli import run


@pytest.fixture(scope="module")
def recorded(big_service: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON result of a real two-stage run, the BASE the tests edit into NEW runs."""
    path = tmp_path_factory.mktemp("compare") / "base.json"
    assert run(["--url", big_service, "--stages", "1s:100,1s:100", "--booths", "10",
                "--json", str(path), "--quiet"]) == 0
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _write(folder: Path, name: str, data: dict[str, Any]) -> str:
    path = folder / name
    path.write_text(json.dumps(data))
    return str(path)


def _pair(folder: Path, base: dict[str, Any], edit: dict[str, Any] | None = None
          ) -> tuple[str, str, dict[str, Any]]:
    """BASE and a NEW that is BASE with ``edit``'s paths ("latency_ms.p99": value) set."""
    new = copy.deepcopy(base)
    for dotted, value in (edit or {}).items():
        *path, last = dotted.split(".")
        target = new
        for key in path:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = value
    return _write(folder, "base.json", base), _write(folder, "new.json", new), new


def test_identical_runs_pass(recorded: dict[str, Any], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    base, new, _ = _pair(tmp_path, recorded)
    assert run(["compare", base, new, "--max-throughput-drop", "0", "--max-p99-rise", "0",
                "--max-error-rate-rise", "0"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK: no regression past the limits")
    assert "throughput req/s" in out and "+0.0%" in out
    assert re.search(r"^check no-duplicate-serials +PASS +PASS$", out, re.MULTILINE)
    assert "stage 2 p99 ms" in out  # both ran the same stages: compared per stage too
    assert out.count("  PASS  max-") == 3


@pytest.mark.parametrize(
    ("factor", "limit", "status"),
    [(1.5, "20", 3), (1.1, "20", 0), (1.19, "20", 0), (1.21, "20", 3)],
)
def test_p99_rise_gate(recorded: dict[str, Any], tmp_path: Path, factor: float, limit: str,
                       status: int, capsys: pytest.CaptureFixture[str]) -> None:
    p99 = recorded["latency_ms"]["p99"]
    base, new, _ = _pair(tmp_path, recorded, {"latency_ms.p99": p99 * factor})
    assert run(["compare", base, new, "--max-p99-rise", limit]) == status
    out = capsys.readouterr().out
    rise = f"{(factor - 1) * 100:+.2f}%"
    if status:
        assert f"FAIL  max-p99-rise: {rise} > 20%" in out
        assert f"REGRESSION: max-p99-rise: {rise} > 20%" in out
    else:
        assert f"PASS  max-p99-rise: {rise} <= 20%" in out


def test_throughput_drop_and_error_rate_rise(recorded: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base, new, _ = _pair(tmp_path, recorded, {
        "throughput_rps": recorded["throughput_rps"] * 0.7, "error_rate": 0.015})
    assert run(["compare", base, new, "--max-throughput-drop", "25",
                "--max-error-rate-rise", "1"]) == 3
    out = capsys.readouterr().out
    assert "FAIL  max-throughput-drop: +30.00% > 25%" in out
    assert "FAIL  max-error-rate-rise: +1.50 points > 1 points" in out  # from 0: in points
    assert "error rate" in out and "1.50%" in out


def test_a_check_that_fails_in_new_is_a_regression(recorded: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base, new, _ = _pair(tmp_path, recorded, {"checks.3.passed": False})
    assert run(["compare", base, new]) == 3
    out = capsys.readouterr().out
    assert re.search(r"^check sales-accounted +PASS +FAIL +REGRESSION$", out, re.MULTILINE)
    assert "REGRESSION: check sales-accounted passed in BASE and fails in NEW" in out
    # The other way round (fixed in NEW) is no regression.
    assert run(["compare", new, base]) == 0


def test_runs_with_different_stages_compare_the_whole_run(recorded: dict[str, Any],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    base, new, _ = _pair(tmp_path, recorded,
                         {"config.stages": [{"duration_s": 3.0, "target": 100.0}]})
    assert run(["compare", base, new]) == 0
    out = capsys.readouterr().out
    assert "note: the runs' stages differ: comparing the whole-run figures only" in out
    assert "stage 1" not in out
    assert "p99.9 ms" in out


def test_json_and_html_output(recorded: dict[str, Any], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    base, new, _ = _pair(tmp_path, recorded,
                         {"latency_ms.p99": recorded["latency_ms"]["p99"] * 2})
    html = tmp_path / "compare.html"
    assert run(["compare", base, new, "--max-p99-rise", "10", "--json", "-",
                "--html", str(html)]) == 3
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["exit_status"] == 3
    assert result["regressions"] == ["max-p99-rise: +100.00% > 10%"]
    p99 = next(m for m in result["metrics"] if m["name"] == "latency_ms.p99")
    assert p99["change_pct"] == pytest.approx(100.0)
    assert "REGRESSION" in captured.err  # the table goes to stderr with --json -
    page = html.read_text()
    assert 'id="verdict">REGRESSION: max-p99-rise: +100.00% &gt; 10%</p>' in page
    assert "<script" not in page


@pytest.mark.parametrize(
    ("edit", "message"),
    [({"version": 99}, "has JSON version 99; this ticketbooth-load reads version 1"),
     ({"latency_ms": {}}, "is not a whole ticketbooth-load JSON result (missing or wrong: 'p50')"),
     ({"requests": 0}, "holds a run that sent no request: nothing to compare")],
)
def test_runs_that_cannot_be_compared_exit_2(recorded: dict[str, Any], tmp_path: Path,
                                             edit: dict[str, Any], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base, new, _ = _pair(tmp_path, recorded, edit)
    assert run(["compare", base, new]) == 2
    err = capsys.readouterr().err
    assert err == f"ticketbooth-load compare: error: {new} {message}\n"


def test_unreadable_input_exits_2(recorded: dict[str, Any], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    base = _write(tmp_path, "base.json", recorded)
    (tmp_path / "junk.json").write_text("{not json")
    assert run(["compare", base, str(tmp_path / "missing.json")]) == 2
    assert "cannot read " in capsys.readouterr().err
    assert run(["compare", base, str(tmp_path / "junk.json")]) == 2
    assert "junk.json is not JSON" in capsys.readouterr().err
    assert run(["compare", base]) == 2
    assert "the following arguments are required: NEW.json" in capsys.readouterr().err
    assert run(["compare", base, base, "--max-p99-rise", "-3"]) == 2
    assert run(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--max-throughput-drop", "--max-p99-rise", "--max-error-rate-rise",
                   "--json", "--html"):
        assert option in out
