"""Latencies and counters: one ``BoothStats`` per booth, merged after the run.

Each booth thread owns its ``BoothStats`` and is the only one that writes it,
so the hot loop takes no lock; ``merge`` combines them once the booths have
stopped.  Latencies are kept in microseconds in an HDR histogram (3
significant figures) for the summary, and raw per request (completion time,
latency, outcome) for the time series and the plot.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from loadtest.history import Purchase
from loadtest.holdrun import HoldRecord

__all__ = [
    "ERROR_KINDS",
    "OUTCOME_ERROR",
    "OUTCOME_OK",
    "OUTCOME_SOLD_OUT",
    "PERCENTILES",
    "TIMESERIES_COLUMNS",
    "BoothStats",
    "RunStats",
    "bucket_row",
    "exact_percentile",
    "latency_summary",
    "merge",
    "new_histogram",
    "timeseries",
]

#: Highest latency the histograms track, in microseconds (one hour); larger values are clamped.
MAX_LATENCY_US = 3_600_000_000
#: Kinds of errors counted separately.
ERROR_KINDS = ("refused", "timeout", "reset", "5xx", "other")
#: Percentiles reported, by label.
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))

OUTCOME_OK = 0
OUTCOME_SOLD_OUT = 1
OUTCOME_ERROR = 2


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


@dataclass
class BoothStats:
    """Everything one booth saw.  Written only by its own thread."""

    booth: int
    url: str
    requests: int = 0
    tickets: int = 0
    sold_out: int = 0
    unknown_tickets: int = 0
    status_counts: Counter[int] = field(default_factory=Counter)
    #: Every kind is there from the start, so readers in other threads see a dict of fixed size.
    errors: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(ERROR_KINDS, 0)))
    serials: list[int] = field(default_factory=list)
    histogram: HdrHistogram = field(default_factory=new_histogram)
    #: Completion time of each request, seconds since the run started.
    done_at: array[float] = field(default_factory=lambda: array("d"))
    #: Latency of each request in microseconds (from the intended send time in open loop).
    latency_us: array[int] = field(default_factory=lambda: array("q"))
    #: OUTCOME_* of each request.
    outcome: array[int] = field(default_factory=lambda: array("b"))
    #: Open loop only: when each request was actually sent, seconds since the run started
    #: (its intended send time follows from its slot), so lateness and achieved rates show,
    #: and the index of its first record in the arrays above.
    sent_at: array[float] = field(default_factory=lambda: array("d"))
    sent_record: array[int] = field(default_factory=lambda: array("q"))
    #: Keyed purchases and their attempts (``--idempotent``, ``--faults``).
    purchases: list[Purchase] = field(default_factory=list)
    #: ``--scenario hold``: every hold made (or perhaps made) and what became of it.
    holds: list[HoldRecord] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def __getstate__(self) -> dict[str, object]:
        # HdrHistogram's counts are a ctypes array, which does not pickle: send it encoded.
        state = self.__dict__.copy()
        state["histogram"] = self.histogram.encode()
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        state["histogram"] = HdrHistogram.decode(state["histogram"])
        self.__dict__.update(state)

    def record(self, done_at: float, latency_us: int, outcome: int) -> None:
        """Record one request's timing (the counters are updated by the caller)."""
        self.requests += 1
        self.histogram.record_value(min(max(latency_us, 1), MAX_LATENCY_US))
        self.done_at.append(done_at)
        self.latency_us.append(latency_us)
        self.outcome.append(outcome)


@dataclass
class RunStats:
    """The booths' stats merged."""

    booths: list[BoothStats]
    requests: int
    tickets: int
    sold_out: int
    unknown_tickets: int
    status_counts: Counter[int]
    errors: Counter[str]
    histogram: HdrHistogram

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        return self.error_count / self.requests if self.requests else 0.0

    def serials(self) -> tuple[int, ...]:
        return tuple(s for b in self.booths for s in b.serials)


def merge(booths: Sequence[BoothStats]) -> RunStats:
    """Combine the booths' stats; the booths themselves are kept for the per-booth table."""
    histogram = new_histogram()
    status_counts: Counter[int] = Counter()
    errors: Counter[str] = Counter({kind: 0 for kind in ERROR_KINDS})
    for b in booths:
        histogram.add(b.histogram)
        status_counts.update(b.status_counts)
        errors.update(b.errors)
    return RunStats(
        booths=list(booths),
        requests=sum(b.requests for b in booths),
        tickets=sum(b.tickets for b in booths),
        sold_out=sum(b.sold_out for b in booths),
        unknown_tickets=sum(b.unknown_tickets for b in booths),
        status_counts=status_counts,
        errors=errors,
        histogram=histogram,
    )


def latency_summary(histogram: HdrHistogram) -> dict[str, float]:
    """p50, p90, p99, p99.9, max and mean of a histogram, in milliseconds."""
    if histogram.get_total_count() == 0:
        return {label: 0.0 for label, _ in PERCENTILES} | {"max": 0.0, "mean": 0.0}
    out = {label: histogram.get_value_at_percentile(p) / 1000.0 for label, p in PERCENTILES}
    out["max"] = histogram.get_max_value() / 1000.0
    out["mean"] = histogram.get_mean_value() / 1000.0
    return out


def exact_percentile(sorted_values: Sequence[float], percentile: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none).

    The smallest value such that at least ``percentile`` percent of the
    values are at or below it -- the same definition HdrHistogram uses.
    """
    if not sorted_values:
        return 0.0
    # Rounded first so that 99.9 % of 1000 is 999, not 1000 by floating-point error.
    rank = max(1, math.ceil(round(percentile * len(sorted_values) / 100.0, 9)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def timeseries(booths: Iterable[BoothStats], bucket_s: float = 1.0) -> list[dict[str, float]]:
    """Per time bucket: requests completed by outcome and latency percentiles (ms).

    Buckets are by completion time since the start of the run; empty buckets
    between busy ones are kept so that a stall shows as a gap.
    """
    buckets: dict[int, list[tuple[int, int]]] = {}
    for b in booths:
        for t, lat, out in zip(b.done_at, b.latency_us, b.outcome, strict=True):
            buckets.setdefault(int(t // bucket_s), []).append((lat, out))
    if not buckets:
        return []
    return [bucket_row(index, bucket_s, buckets.get(index, []))
            for index in range(max(buckets) + 1)]


#: The columns of a time series row (the JSON ``timeseries`` and the ``--csv`` file).
TIMESERIES_COLUMNS = ("t", "requests", "ok", "sold_out", "errors", "throughput_rps", "p50_ms",
                      "p90_ms", "p99_ms")


def bucket_row(index: int, bucket_s: float, entries: Sequence[tuple[int, int]]
               ) -> dict[str, float]:
    """The time series row of bucket ``index``: its requests' (latency_us, outcome) pairs."""
    latencies = sorted(e[0] for e in entries)
    outcomes = Counter(e[1] for e in entries)
    row: dict[str, float] = {
        "t": round(index * bucket_s, 6),
        "requests": len(entries),
        "ok": outcomes[OUTCOME_OK],
        "sold_out": outcomes[OUTCOME_SOLD_OUT],
        "errors": outcomes[OUTCOME_ERROR],
        "throughput_rps": len(entries) / bucket_s,
    }
    for label, p in PERCENTILES[:3]:
        row[f"{label}_ms"] = exact_percentile(latencies, p) / 1000.0
    return row
