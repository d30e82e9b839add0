"""The four checks as pure functions: a clean record passes, and each violation fails
exactly its own check."""

from __future__ import annotations

import dataclasses

import pytest

from loadtest.checks import (
    CHECK_NAMES,
    RunRecord,
    Snapshot,
    check_accounting,
    check_no_duplicates,
    check_serials_in_range,
    check_stock,
    check_thresholds,
    failed,
    run_checks,
)

BEFORE = Snapshot(remaining=100, sold=0, total=100)
AFTER = Snapshot(remaining=0, sold=100, total=100)
CLEAN = RunRecord(serials=tuple(range(1, 101)), before=BEFORE, after=AFTER,
                  acknowledged=100, unknown=0)


def test_clean_run_passes_every_check() -> None:
    results = run_checks(CLEAN)
    assert [r.name for r in results] == list(CHECK_NAMES)
    assert all(r.passed for r in results), results
    assert failed(results) == []


def _with(**changes: object) -> RunRecord:
    return dataclasses.replace(CLEAN, **changes)  # type: ignore[arg-type]


# Each record breaks one promise and only that one.
VIOLATIONS = [
    pytest.param(_with(serials=(*range(1, 100), 7), after=AFTER), "no-duplicate-serials",
                 id="duplicate-serial"),
    pytest.param(_with(serials=(*range(1, 100), 101)), "serials-in-range", id="serial-above-total"),
    pytest.param(_with(serials=(0, *range(2, 101))), "serials-in-range", id="serial-zero"),
    # One request got no answer and the server sold beyond its stock with it.
    pytest.param(_with(after=Snapshot(remaining=-1, sold=101, total=100), unknown=1),
                 "stock-consistent", id="sold-beyond-stock"),
    pytest.param(_with(after=Snapshot(remaining=5, sold=100, total=100)), "stock-consistent",
                 id="counts-do-not-add-up"),
    pytest.param(_with(after=Snapshot(remaining=10, sold=90, total=100), unknown=0),
                 "sales-accounted", id="acknowledged-not-counted"),
    pytest.param(_with(serials=tuple(range(1, 91)), acknowledged=90, unknown=5),
                 "sales-accounted", id="sold-but-never-acknowledged"),
]


@pytest.mark.parametrize(("record", "expected"), VIOLATIONS)
def test_each_violation_fails_its_check(record: RunRecord, expected: str) -> None:
    assert failed(run_checks(record)) == [expected]


def test_duplicates_are_counted_and_quoted() -> None:
    result = check_no_duplicates([1, 2, 2, 3, 3, 3])
    assert not result.passed
    assert "6 serials handed out but only 3 distinct" in result.detail
    assert "2 serials went to more than one buyer (3 extra)" in result.detail
    assert "e.g. 2, 3" in result.detail


def test_no_serials_is_not_a_failure() -> None:
    assert check_no_duplicates([]).passed
    assert check_serials_in_range([], 100).passed


def test_range_names_the_offenders() -> None:
    result = check_serials_in_range([1, 0, 101, 50], 100)
    assert not result.passed
    assert result.detail == "2 serials outside 1..100: 0, 101"


@pytest.mark.parametrize(
    ("snap", "fragment"),
    [
        (Snapshot(remaining=0, sold=101, total=100), "sold 101 > total 100"),
        (Snapshot(remaining=-1, sold=100, total=100), "remaining -1 < 0"),
        (Snapshot(remaining=3, sold=96, total=100), "= 99 != total 100"),
    ],
)
def test_stock_problems_are_named(snap: Snapshot, fragment: str) -> None:
    result = check_stock(BEFORE, snap)
    assert not result.passed
    assert fragment in result.detail


def test_stock_total_must_not_change() -> None:
    result = check_stock(BEFORE, Snapshot(remaining=0, sold=120, total=120))
    assert not result.passed
    assert "total changed during the run: 100 -> 120" in result.detail


def test_after_unreadable_fails_the_server_side_checks() -> None:
    record = _with(after=None, after_error="connection refused")
    assert failed(run_checks(record)) == ["stock-consistent", "sales-accounted"]
    assert "connection refused" in run_checks(record)[2].detail


@pytest.mark.parametrize(
    ("acknowledged", "increase", "unknown", "passed"),
    [
        (10, 10, 0, True),
        (10, 10, 3, True),   # the unknown ones did not sell
        (10, 13, 3, True),   # all the unknown ones sold
        (10, 12, 3, True),
        (10, 14, 3, False),  # one more than could be explained
        (10, 9, 3, False),   # acknowledged but not counted
        (0, 0, 0, True),
    ],
)
def test_accounting_bounds(acknowledged: int, increase: int, unknown: int, passed: bool) -> None:
    before = Snapshot(remaining=50, sold=50, total=100)
    after = Snapshot(remaining=50 - increase, sold=50 + increase, total=100)
    result = check_accounting(before, after, acknowledged, unknown)
    assert result.passed is passed
    figures = f"acknowledged {acknowledged}, sold rose by {increase}, unknown {unknown}"
    assert figures in result.detail
    assert "only buyer" in result.title


def test_thresholds() -> None:
    assert check_thresholds(5.0, 0.0, None, None) == []
    p99, rate = check_thresholds(5.0, 0.02, max_p99_ms=4.0, max_error_rate=0.02)
    assert (p99.name, p99.passed, p99.value, p99.limit) == ("max-p99-ms", False, 5.0, 4.0)
    assert (rate.name, rate.passed) == ("max-error-rate", True)
