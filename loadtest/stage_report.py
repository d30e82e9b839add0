"""Open-loop figures: how late requests were sent, and the run broken down by stage.

A booth's ``i``-th open-loop request holds the slot ``booth - 1 + i * booths``
(slots are global across processes), so its intended send time follows from
the plan; ``BoothStats.sent_at`` holds when it was actually sent, and
``BoothStats.sent_record`` where its records begin (a request may record more
than one attempt).  A request belongs to the stage its slot is scheduled in; a
stage's achieved rate counts the requests actually sent within its time window.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.booths import LoadPlan
from loadtest.stats import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_SOLD_OUT, BoothStats, exact_percentile

__all__ = ["LATE_MS", "lateness", "stage_lines", "stage_rows"]

#: A request sent more than this many milliseconds after its intended time counts as late.
LATE_MS = 10.0


@dataclass(frozen=True)
class _Sent:
    slot: int
    intended: float
    sent: float
    #: The request's records: (latency_us, outcome) of each attempt.
    records: list[tuple[int, int]]


def _sent(plan: LoadPlan, booths: Sequence[BoothStats]) -> Iterator[_Sent]:
    for b in booths:
        first = b.booth - 1
        ends = [*b.sent_record[1:], len(b.outcome)]
        for i, (sent, start, end) in enumerate(zip(b.sent_at, b.sent_record, ends,
                                                   strict=True)):
            slot = first + i * plan.booths
            records = list(zip(b.latency_us[start:end], b.outcome[start:end], strict=True))
            yield _Sent(slot, plan.send_time(slot), sent, records)


def lateness(plan: LoadPlan, booths: Sequence[BoothStats]) -> dict[str, Any] | None:
    """How many open-loop requests were sent more than LATE_MS late, and the worst; None in
    closed loop."""
    if plan.mode != "open":
        return None
    lags = sorted(max(r.sent - r.intended, 0.0) * 1000.0 for r in _sent(plan, booths))
    return {
        "threshold_ms": LATE_MS,
        "sent": len(lags),
        "late": sum(1 for lag in lags if lag > LATE_MS),
        "p99_ms": exact_percentile(lags, 99.0),
        "max_ms": lags[-1] if lags else 0.0,
    }


def stage_rows(plan: LoadPlan, booths: Sequence[BoothStats]) -> list[dict[str, Any]] | None:
    """One JSON-ready row per stage; None without stages."""
    schedule = plan.schedule
    if schedule is None:
        return None
    scheduled = schedule.scheduled()
    firsts = [sum(scheduled[:i]) for i in range(len(scheduled))]
    latencies: list[list[int]] = [[] for _ in scheduled]
    outcomes = [[0, 0, 0] for _ in scheduled]
    in_window = [0] * len(scheduled)
    sent = [0] * len(scheduled)
    late = [0] * len(scheduled)
    for r in _sent(plan, booths):
        # By slot, not by time, so that the counts add up to the scheduled ones exactly (the
        # rightmost match skips the stages that hold no request).
        i = bisect_right(firsts, r.slot) - 1
        sent[i] += 1
        for latency_us, outcome in r.records:
            latencies[i].append(latency_us)
            outcomes[i][outcome] += 1
        late[i] += (r.sent - r.intended) * 1000.0 > LATE_MS
        if r.sent < schedule.duration:
            in_window[schedule.stage_of(r.sent)] += 1
    rows = []
    for i, (stage, begin) in enumerate(zip(schedule.stages, schedule.start_rates, strict=True)):
        ordered = sorted(latencies[i])
        rows.append({
            "stage": i + 1,
            "start_s": schedule.bounds[i],
            "duration_s": stage.duration,
            "start_rate": begin,
            "end_rate": stage.target,
            "scheduled": scheduled[i],
            "sent": sent[i],
            "target_rps": scheduled[i] / stage.duration,
            "achieved_rps": in_window[i] / stage.duration,
            "late": late[i],
            "latency_ms": {label: exact_percentile(ordered, p) / 1000.0
                           for label, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))},
            "ok": outcomes[i][OUTCOME_OK],
            "sold_out": outcomes[i][OUTCOME_SOLD_OUT],
            "errors": outcomes[i][OUTCOME_ERROR],
        })
    return rows


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def stage_lines(rows: list[dict[str, Any]] | None, late: dict[str, Any] | None) -> list[str]:
    """The console lines: the per-stage table (with stages) and the lateness line (open loop)."""
    lines: list[str] = []
    if rows:
        head = ["stage", "from s", "rate/s", "scheduled", "sent", "target/s", "achieved/s",
                "p50 ms", "p90 ms", "p99 ms", "200", "409", "errors", "late"]
        body = [[str(r["stage"]), f"{r['start_s']:g}",
                 f"{r['start_rate']:g}->{r['end_rate']:g}", str(r["scheduled"]), str(r["sent"]),
                 f"{r['target_rps']:.1f}", f"{r['achieved_rps']:.1f}",
                 *(_ms(r["latency_ms"][k]) for k in ("p50", "p90", "p99")),
                 str(r["ok"]), str(r["sold_out"]), str(r["errors"]), str(r["late"])]
                for r in rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        table = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                 for row in [head, *body]]
        lines += ["", "stages (latency from intended send times; achieved from actual ones)",
                  table[0], "-" * len(table[0]), *table[1:]]
    if late is not None:
        if late["late"]:
            lines.append(f"sent late   {late['late']} of {late['sent']} requests more than "
                         f"{late['threshold_ms']:g} ms after their intended time (p99 "
                         f"{_ms(late['p99_ms'])} ms, max {_ms(late['max_ms'])} ms): the booths "
                         "did not always keep up (more --booths or --processes may help)")
        else:
            lines.append(f"on time     every request sent within {late['threshold_ms']:g} ms of "
                         f"its intended time (max {_ms(late['max_ms'])} ms)")
    return lines
