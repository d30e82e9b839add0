"""Percentiles, merging and the time series of the load generator's statistics."""

from __future__ import annotations

import pytest

from loadtest.processes import split_budget
from loadtest.stats import (
    OUTCOME_ERROR,
    OUTCOME_OK,
    OUTCOME_SOLD_OUT,
    BoothStats,
    exact_percentile,
    latency_summary,
    merge,
    new_histogram,
    timeseries,
)


@pytest.mark.parametrize(
    ("values", "percentile", "expected"),
    [
        ([], 50, 0.0),
        ([7], 50, 7.0),
        ([7], 99.9, 7.0),
        ([1, 2, 3, 4], 50, 2.0),
        ([1, 2, 3, 4], 75, 3.0),
        ([1, 2, 3, 4], 76, 4.0),
        ([1, 2, 3, 4], 100, 4.0),
        (list(range(1, 101)), 90, 90.0),
        (list(range(1, 101)), 99, 99.0),
        (list(range(1, 1001)), 99.9, 999.0),
        (list(range(1, 101)), 0, 1.0),
    ],
)
def test_exact_percentile_is_nearest_rank(values: list[int], percentile: float,
                                          expected: float) -> None:
    assert exact_percentile(values, percentile) == expected


def test_histogram_summary_in_milliseconds() -> None:
    h = new_histogram()
    for us in range(1, 1001):  # 1 us .. 1000 us, exact at 3 significant figures
        h.record_value(us)
    s = latency_summary(h)
    assert s["p50"] == 0.5
    assert s["p90"] == 0.9
    assert s["p99"] == 0.99
    assert s["p99.9"] == 0.999
    assert s["max"] == 1.0
    assert s["mean"] == pytest.approx(0.5005, abs=1e-6)


def test_empty_summary_is_zeros() -> None:
    assert set(latency_summary(new_histogram()).values()) == {0.0}


def _booth(index: int, latencies_us: list[int], outcome: int = OUTCOME_OK) -> BoothStats:
    b = BoothStats(booth=index, url="http://127.0.0.1:9")
    for i, us in enumerate(latencies_us):
        b.record(done_at=i * 0.5, latency_us=us, outcome=outcome)
    return b


def test_merge_adds_counts_and_histograms() -> None:
    a = _booth(1, [100, 200, 300])
    a.tickets, a.status_counts[200], a.serials = 3, 3, [1, 2, 3]
    b = _booth(2, [1000, 2000], OUTCOME_ERROR)
    b.errors["reset"], b.errors["5xx"], b.unknown_tickets = 1, 1, 1
    b.status_counts[500] = 1
    c = _booth(3, [400], OUTCOME_SOLD_OUT)
    c.sold_out, c.status_counts[409], c.serials = 1, 1, []

    run = merge([a, b, c])
    assert run.requests == 6
    assert run.tickets == 3
    assert run.sold_out == 1
    assert run.unknown_tickets == 1
    assert run.status_counts == {200: 3, 500: 1, 409: 1}
    assert run.errors == {"refused": 0, "timeout": 0, "reset": 1, "5xx": 1, "other": 0}
    assert run.error_count == 2
    assert run.error_rate == pytest.approx(2 / 6)
    assert run.serials() == (1, 2, 3)
    # The merged histogram is the histogram of all six values.
    assert run.histogram.get_total_count() == 6
    s = latency_summary(run.histogram)
    assert s["p50"] == 0.3
    assert s["max"] == pytest.approx(2.0, rel=1e-3)
    assert s["mean"] == pytest.approx((100 + 200 + 300 + 1000 + 2000 + 400) / 6 / 1000, rel=1e-3)
    # The booths are kept as they were for the per-booth table.
    assert [x.booth for x in run.booths] == [1, 2, 3]


def test_merge_of_nothing() -> None:
    run = merge([])
    assert (run.requests, run.error_rate, run.histogram.get_total_count()) == (0, 0.0, 0)


def test_timeseries_buckets_by_completion_second_and_keeps_gaps() -> None:
    b = BoothStats(booth=1, url="u")
    b.record(0.1, 1000, OUTCOME_OK)
    b.record(0.9, 3000, OUTCOME_SOLD_OUT)
    b.record(2.5, 2000, OUTCOME_ERROR)
    rows = timeseries([b])
    assert [r["t"] for r in rows] == [0, 1, 2]
    assert [r["requests"] for r in rows] == [2, 0, 1]
    assert (rows[0]["ok"], rows[0]["sold_out"], rows[0]["errors"]) == (1, 1, 0)
    assert rows[0]["p50_ms"] == 1.0
    assert rows[0]["p99_ms"] == 3.0
    assert rows[1]["p99_ms"] == 0.0
    assert rows[2]["errors"] == 1
    assert timeseries([]) == []


@pytest.mark.parametrize(
    ("total", "shares", "expected"),
    [
        (None, [3, 2], [None, None]),
        (101, [3, 2], [61, 40]),
        (10, [1, 1, 1], [4, 3, 3]),
        (1, [2, 2], [1, 0]),
        (0, [5], [0]),
    ],
)
def test_split_budget_sums_to_the_total(total: int | None, shares: list[int],
                                        expected: list[int | None]) -> None:
    assert split_budget(total, shares) == expected
