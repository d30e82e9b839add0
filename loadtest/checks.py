"""The service's promises, checked over what a run recorded.

Pure functions: they take the serials the booths were handed, the server's
``GET /remaining`` answers before and after the run, and the ticket counts the
booths saw acknowledged or could not know about, and answer PASS or FAIL with
the figures.  Nothing here does I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CHECK_NAMES",
    "CheckResult",
    "RunRecord",
    "Snapshot",
    "ThresholdResult",
    "check_accounting",
    "check_no_duplicates",
    "check_serials_in_range",
    "check_stock",
    "check_thresholds",
    "failed",
    "run_checks",
]

#: Short names, in the order the checks run; they name a failure on the console.
CHECK_NAMES = ("no-duplicate-serials", "serials-in-range", "stock-consistent", "sales-accounted")

#: How many offending serials a detail line quotes at most.
_QUOTE = 10


@dataclass(frozen=True)
class Snapshot:
    """One answer of ``GET /remaining``."""

    remaining: int
    sold: int
    total: int
    held: int = 0  # tickets in live holds (0 from a service without holds)

    def as_dict(self) -> dict[str, int]:
        return {"remaining": self.remaining, "sold": self.sold, "held": self.held,
                "total": self.total}


@dataclass(frozen=True)
class RunRecord:
    """What the checks need to know about a finished run.

    ``acknowledged`` is the number of tickets the booths received in 200
    answers; ``unknown`` the number of tickets asked for in requests that got
    no answer at all after they may have reached the server (reset, read
    timeout), which may or may not have been sold.
    """

    serials: tuple[int, ...]
    before: Snapshot
    after: Snapshot | None
    acknowledged: int
    unknown: int
    after_error: str = ""


@dataclass(frozen=True)
class CheckResult:
    name: str
    title: str
    passed: bool
    detail: str

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "title": self.title, "passed": self.passed,
                "detail": self.detail}


def _quote(values: Iterable[int]) -> str:
    values = sorted(values)
    text = ", ".join(str(v) for v in values[:_QUOTE])
    return text + (", ..." if len(values) > _QUOTE else "")


def check_no_duplicates(serials: Iterable[int]) -> CheckResult:
    """Check 1: no serial was handed to two buyers."""
    counts = Counter(serials)
    handed = sum(counts.values())
    dupes = {s: n for s, n in counts.items() if n > 1}
    title = "no serial handed to two buyers"
    if not dupes:
        return CheckResult(CHECK_NAMES[0], title, True,
                           f"{handed} serials handed out, {len(counts)} distinct")
    extra = sum(n - 1 for n in dupes.values())
    return CheckResult(
        CHECK_NAMES[0], title, False,
        f"{handed} serials handed out but only {len(counts)} distinct: "
        f"{len(dupes)} serials went to more than one buyer ({extra} extra), "
        f"e.g. {_quote(dupes)}",
    )


def check_serials_in_range(serials: Iterable[int], total: int) -> CheckResult:
    """Check 2: every serial lies within 1..total."""
    distinct = set(serials)
    outside = {s for s in distinct if not 1 <= s <= total}
    title = f"every serial within 1..{total}"
    if not outside:
        if distinct:
            span = f"lowest {min(distinct)}, highest {max(distinct)}"
        else:
            span = "no serials handed out"
        return CheckResult(CHECK_NAMES[1], title, True, span)
    return CheckResult(CHECK_NAMES[1], title, False,
                       f"{len(outside)} serials outside 1..{total}: {_quote(outside)}")


def _stock_problems(label: str, snap: Snapshot) -> list[str]:
    problems = []
    if snap.sold > snap.total:
        problems.append(f"{label}: sold {snap.sold} > total {snap.total}")
    if snap.remaining < 0:
        problems.append(f"{label}: remaining {snap.remaining} < 0")
    if snap.held < 0:
        problems.append(f"{label}: held {snap.held} < 0")
    if snap.sold + snap.held + snap.remaining != snap.total:
        problems.append(f"{label}: sold {snap.sold} + held {snap.held} + remaining "
                        f"{snap.remaining} = {snap.sold + snap.held + snap.remaining} "
                        f"!= total {snap.total}")
    return problems


def check_stock(before: Snapshot, after: Snapshot | None, after_error: str = "") -> CheckResult:
    """Check 3: the server never sold more than its stock, and its counts add up."""
    title = "never sold more than the stock"
    if after is None:
        return CheckResult(CHECK_NAMES[2], title, False,
                           f"could not read /remaining after the run: {after_error}")
    problems = _stock_problems("before", before) + _stock_problems("after", after)
    if before.total != after.total:
        problems.append(f"total changed during the run: {before.total} -> {after.total}")
    if problems:
        return CheckResult(CHECK_NAMES[2], title, False, "; ".join(problems))
    return CheckResult(CHECK_NAMES[2], title, True,
                       f"sold {after.sold} + held {after.held} + remaining {after.remaining} "
                       f"= total {after.total}")


def check_accounting(before: Snapshot, after: Snapshot | None, acknowledged: int, unknown: int,
                     after_error: str = "") -> CheckResult:
    """Check 4: acknowledged <= increase in sold <= acknowledged + unknown.

    Assumes the run was the only buyer while it ran.
    """
    title = "nothing lost or invented (assumes this run was the only buyer)"
    if after is None:
        return CheckResult(CHECK_NAMES[3], title, False,
                           f"could not read /remaining after the run: {after_error}")
    increase = after.sold - before.sold
    bounds = f"acknowledged {acknowledged}, sold rose by {increase}, unknown {unknown}"
    if increase < acknowledged:
        return CheckResult(CHECK_NAMES[3], title, False,
                           f"{bounds}: {acknowledged - increase} tickets acknowledged to booths "
                           "were never counted as sold (oversold)")
    if increase > acknowledged + unknown:
        return CheckResult(CHECK_NAMES[3], title, False,
                           f"{bounds}: {increase - acknowledged - unknown} tickets counted as sold "
                           "that no booth received (lost)")
    return CheckResult(CHECK_NAMES[3], title, True,
                       f"{bounds}: {acknowledged} <= {increase} <= {acknowledged + unknown}")


def run_checks(record: RunRecord) -> list[CheckResult]:
    """All four checks, in order."""
    return [
        check_no_duplicates(record.serials),
        check_serials_in_range(record.serials, record.before.total),
        check_stock(record.before, record.after, record.after_error),
        check_accounting(record.before, record.after, record.acknowledged, record.unknown,
                         record.after_error),
    ]


def failed(results: Iterable[CheckResult]) -> list[str]:
    """Names of the failed checks."""
    return [r.name for r in results if not r.passed]


@dataclass(frozen=True)
class ThresholdResult:
    """A k6-style threshold: a figure of the run against a limit set on the command line."""

    name: str
    limit: float
    value: float
    passed: bool

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "limit": self.limit, "value": self.value,
                "passed": self.passed}


def check_thresholds(p99_ms: float, error_rate: float, max_p99_ms: float | None,
                     max_error_rate: float | None) -> list[ThresholdResult]:
    """The thresholds that were set, each passed when the figure is at or under its limit."""
    results = []
    if max_p99_ms is not None:
        results.append(ThresholdResult("max-p99-ms", max_p99_ms, p99_ms, p99_ms <= max_p99_ms))
    if max_error_rate is not None:
        results.append(ThresholdResult("max-error-rate", max_error_rate, error_rate,
                                       error_rate <= max_error_rate))
    return results
