"""--scenario hold: the held checks as pure functions, and real runs on every store kind the
generator can spawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.checks import CHECK_NAMES, Snapshot
from loadtest.cli import run
from loadtest.holdrun import (
    CLOCK_TOLERANCE_S,
    HOLD_CHECK_NAMES,
    HoldRecord,
    check_held_at_end,
    check_holds_ended,
    latest_expiry,
    parse_expiry,
)

# A read of /remaining from t=100.0 to t=100.1 (the generator's clock).
READ = (100.0, 100.1)
LATER = 100.1 + CLOCK_TOLERANCE_S + 5  # expires well after the read
EARLIER = 100.0 - CLOCK_TOLERANCE_S - 5  # expired well before it
DURING = 100.05  # expires during the read: may or may not count

HOLDS = [HoldRecord(2, LATER, "abandoned"), HoldRecord(3, EARLIER, "abandoned"),
         HoldRecord(4, DURING, "abandoned"), HoldRecord(5, LATER, "confirmed", [1, 2, 3, 4, 5]),
         HoldRecord(6, LATER, "released"), HoldRecord(7, LATER, "unknown"),
         HoldRecord(8, LATER, "expired")]


# (held read, passes): surely held 2; maybe 2 + 4 (during the read) + 7 (unknown) = 13.
@pytest.mark.parametrize(("held", "passes"), [(2, True), (6, True), (13, True), (9, True),
                                              (1, False), (0, False), (14, False),
                                              (19, False)])
def test_held_at_the_end_lies_between_sure_and_possible_holds(held: int, passes: bool) -> None:
    result = check_held_at_end(HOLDS, held, *READ)
    assert result.name == HOLD_CHECK_NAMES[0]
    assert result.passed == passes, result.detail
    assert "2..13" in result.detail


def test_an_unreadable_count_fails_the_check() -> None:
    result = check_held_at_end(HOLDS, None, *READ, error="connection refused")
    assert not result.passed and "connection refused" in result.detail


@pytest.mark.parametrize(("after", "passes"), [
    (Snapshot(remaining=10, sold=0, total=10, held=0), True),
    (Snapshot(remaining=8, sold=0, total=10, held=2), False),
    (None, False),
])
def test_nothing_is_held_once_every_hold_has_ended(after: Snapshot | None,
                                                   passes: bool) -> None:
    assert check_holds_ended(after, "gone").passed == passes


def test_the_run_waits_for_the_last_hold_that_may_be_held() -> None:
    assert latest_expiry(HOLDS) == LATER  # abandoned and unknown ones only
    assert latest_expiry([HoldRecord(1, LATER, "confirmed")]) == 0.0
    assert parse_expiry("2026-11-28T05:00:00.250000Z") == 1795842000.25


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_hold_run_passes_every_check(store: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    store_arg = "memory" if store == "memory" else f"sqlite:///{tmp_path / 'tickets.db'}"
    status = run(["--spawn", "--store", store_arg, "--tickets", "300", "--scenario", "hold",
                  "--hold-ttl", "1", "--release", "0.2", "--abandon", "0.2",
                  "--confirm-after", "5", "--quantity", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["checks"]] == [*CHECK_NAMES, *HOLD_CHECK_NAMES]
    assert all(c["passed"] for c in data["checks"]), data["checks"]
    assert data["status_counts"]["201"] > 0 and data["status_counts"]["204"] > 0
    assert data["tickets_acknowledged"] == data["remaining_after"]["sold"] > 0
    assert data["remaining_after"]["held"] == 0
    assert "PASS: all 6 checks passed" in text


@pytest.mark.parametrize("given", [["--release", "0.6", "--abandon", "0.6"],
                                   ["--idempotent"], ["--processes", "2"]])
def test_hold_options_that_do_not_fit_exit_2(given: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--spawn", "--scenario", "hold", *given]) == 2
    err = capsys.readouterr().err
    assert "--scenario hold does not take" in err or "add up to more than 1" in err


def test_hold_options_need_the_hold_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--spawn", "--release", "0.5"]) == 2
    assert "only apply with --scenario hold" in capsys.readouterr().err
