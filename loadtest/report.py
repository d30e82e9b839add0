"""What a run shows: the console table, the JSON result, the plot and the progress bar."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, TYPE_CHECKING, Any

from loadtest.booths import LoadPlan
from loadtest.checks import CheckResult, Snapshot, ThresholdResult
from loadtest.stage_report import lateness, stage_lines, stage_rows
from loadtest.stats import ERROR_KINDS, BoothStats, RunStats, latency_summary, timeseries

if TYPE_CHECKING:
    from loadtest.faultrun import FaultSection

__all__ = ["JSON_VERSION", "Progress", "Report", "format_text", "to_json", "write_plot"]

#: Bumped when a field of the JSON result changes meaning or goes away.
JSON_VERSION = 1


@dataclass
class Report:
    """Everything known about a finished run."""

    plan: LoadPlan
    stats: RunStats
    elapsed: float
    started_at: str
    before: Snapshot
    after: Snapshot | None
    checks: list[CheckResult]
    thresholds: list[ThresholdResult] = field(default_factory=list)
    interrupted: bool = False
    spawn: dict[str, Any] | None = None
    exit_status: int = 0
    #: Keyed purchases and injected faults (--idempotent, --faults), else None.
    faults: FaultSection | None = None

    @property
    def latency(self) -> dict[str, float]:
        return latency_summary(self.stats.histogram)

    @property
    def throughput(self) -> float:
        return self.stats.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    @property
    def breached(self) -> list[str]:
        return [t.name for t in self.thresholds if not t.passed]

    @cached_property
    def stages(self) -> list[dict[str, Any]] | None:
        """Per-stage figures with ``--stages`` (loadtest.stage_report)."""
        return stage_rows(self.plan, self.stats.booths)

    @cached_property
    def lateness(self) -> dict[str, Any] | None:
        """Open loop: how many requests were sent late, and by how much."""
        return lateness(self.plan, self.stats.booths)


def _stop_condition(plan: LoadPlan) -> str:
    parts = []
    if plan.requests is not None:
        parts.append(f"{plan.requests} requests")
    if plan.duration is not None:
        parts.append(f"{plan.duration:g} s")
    return " or ".join(parts) if parts else "until sold out"


def describe_plan(plan: LoadPlan) -> str:
    loop = f"open loop at {plan.rate:g} requests/s" if plan.rate else "closed loop"
    if plan.schedule is not None:
        loop = f"open loop, {plan.schedule.describe()}"
    think = f", think {plan.think_s * 1000:g} ms" if plan.think_s else ""
    procs = f" in {min(plan.processes, plan.booths)} processes" if plan.processes > 1 else ""
    return (f"{plan.booths} booths{procs}, {loop}, quantity {plan.quantity}{think}, "
            f"{_stop_condition(plan)}")


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _booth_table(booths: Sequence[BoothStats], several_urls: bool) -> list[str]:
    head = ["booth", "tickets", "requests", "sold out", "errors"]
    rows = [[str(b.booth), str(b.tickets), str(b.requests), str(b.sold_out), str(b.error_count)]
            for b in booths]
    total = ["total", str(sum(b.tickets for b in booths)), str(sum(b.requests for b in booths)),
             str(sum(b.sold_out for b in booths)), str(sum(b.error_count for b in booths))]
    if several_urls:
        head.append("url")
        for row, b in zip(rows, booths, strict=True):
            row.append(b.url)
        total.append("")
    widths = [max(len(r[i]) for r in [head, *rows, total]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:5], widths[1:5], strict=True)]
        out += [c.ljust(w) for c, w in zip(cells[5:], widths[5:], strict=True)]
        return "  ".join(out).rstrip()

    rule = "-" * len(line(head))
    return [line(head), rule, *(line(r) for r in rows), rule, line(total)]


def _snap(s: Snapshot | None) -> str:
    if s is None:
        return "unknown"
    return f"remaining {s.remaining}, sold {s.sold}, held {s.held}, total {s.total}"


def format_text(report: Report) -> str:
    """The human report: booth table, totals, latency, statuses, errors, checks, verdict."""
    st = report.stats
    plan = report.plan
    lines = [f"ticketbooth load test: {describe_plan(plan)}",
             f"against {', '.join(plan.urls)}"
             + (f" (spawned: store {report.spawn['store']}, {report.spawn['tickets']} tickets)"
                if report.spawn else ""),
             ""]
    if report.interrupted:
        lines += ["interrupted: the figures below cover the run until Ctrl-C", ""]
    lines += _booth_table(st.booths, len(plan.urls) > 1)
    lat = report.latency
    statuses = "  ".join(f"{code}: {n}" for code, n in sorted(st.status_counts.items())) or "none"
    errors = "  ".join(f"{kind} {st.errors[kind]}" for kind in ERROR_KINDS)
    lines += [
        "",
        f"requests    {st.requests} in {report.elapsed:.2f} s: {report.throughput:.1f} requests/s,"
        f" {st.tickets} tickets ({st.tickets / report.elapsed if report.elapsed else 0.0:.1f}/s)",
        "latency     " + "  ".join(f"{k} {_ms(v)}" for k, v in lat.items())
        + ("  (from intended send times)" if plan.mode == "open" else ""),
        f"status      {statuses}",
        f"errors      {errors}  (error rate {st.error_rate:.2%},"
        f" {st.unknown_tickets} tickets unknown)",
        *stage_lines(report.stages, report.lateness),
        *(report.faults.lines() if report.faults else []),
        *hints(st.status_counts),
        "",
        f"/remaining  before: {_snap(report.before)}",
        f"            after:  {_snap(report.after)}",
        "",
        "checks",
    ]
    for i, c in enumerate(report.checks, 1):
        lines.append(f"  {c.verdict}  {i}. {c.title}: {c.detail}")
    if report.thresholds:
        lines += ["", "thresholds"]
        for t in report.thresholds:
            shown = _ms(t.value) if t.name == "max-p99-ms" else f"{t.value:.4f}"
            limit = _ms(t.limit) if t.name == "max-p99-ms" else f"{t.limit:g}"
            sign = "<=" if t.passed else ">"
            lines.append(f"  {'PASS' if t.passed else 'FAIL'}  {t.name}: {shown} {sign} {limit}")
    lines += ["", verdict(report)]
    return "\n".join(lines)


#: What a 429 from the service means for a load test, and the setting to change.
PER_CLIENT_HINT = ("the service caps connections per client address, and every booth of this "
                   "run connects from this one: start the service with "
                   "--max-connections-per-client 0 (TICKETBOOTH_MAX_CONNECTIONS_PER_CLIENT=0) "
                   "or above --booths, or run fewer booths")


def hints(status_counts: Mapping[int, int]) -> list[str]:
    """What to change when the answers say the service refused the run, not the sale."""
    refused = status_counts.get(429, 0)
    if not refused:
        return []
    return [f"hint        {refused} answers were 429 too_many_connections: {PER_CLIENT_HINT}"]


def verdict(report: Report) -> str:
    """The one-line outcome, naming what failed."""
    n = len(report.checks)
    if report.interrupted:
        failed = ", ".join(report.failed_checks) or "none"
        return f"INTERRUPTED: the run was cut short (failed checks: {failed})"
    if report.failed_checks:
        return (f"FAIL: {len(report.failed_checks)} of {n} checks failed: "
                f"{', '.join(report.failed_checks)}")
    if report.breached:
        return f"FAIL: all {n} checks passed but thresholds breached: {', '.join(report.breached)}"
    return f"PASS: all {n} checks passed"


def to_json(report: Report) -> dict[str, Any]:
    """The full result as plain JSON-able data (fields documented in the README)."""
    plan = report.plan
    st = report.stats
    return {
        "version": JSON_VERSION,
        "started_at": report.started_at,
        "config": {
            "urls": list(plan.urls),
            "booths": plan.booths,
            "quantity": plan.quantity,
            "requests": plan.requests,
            "duration_s": plan.duration,
            "rate": plan.rate,
            "think_ms": plan.think_s * 1000.0,
            "timeout_s": plan.timeout,
            "processes": plan.processes,
            "stages": ([{"duration_s": s.duration, "target": s.target}
                        for s in plan.schedule.stages] if plan.schedule else None),
            "start_rate": plan.schedule.start_rate if plan.schedule else None,
            "mode": plan.mode,
            "until_sold_out": plan.until_sold_out,
            "spawn": report.spawn,
        },
        "interrupted": report.interrupted,
        "elapsed_s": report.elapsed,
        "requests": st.requests,
        "throughput_rps": report.throughput,
        "tickets_acknowledged": st.tickets,
        "tickets_unknown": st.unknown_tickets,
        "sold_out_responses": st.sold_out,
        "status_counts": {str(code): n for code, n in sorted(st.status_counts.items())},
        "errors": {kind: st.errors[kind] for kind in ERROR_KINDS},
        "error_rate": st.error_rate,
        "latency_ms": report.latency,
        "booths": [
            {"booth": b.booth, "url": b.url, "tickets": b.tickets, "requests": b.requests,
             "sold_out": b.sold_out, "errors": b.error_count}
            for b in st.booths
        ],
        "remaining_before": report.before.as_dict(),
        "remaining_after": report.after.as_dict() if report.after else None,
        "checks": [c.as_dict() for c in report.checks],
        "thresholds": [t.as_dict() for t in report.thresholds],
        "timeseries": timeseries(st.booths),
        "stages": report.stages,
        "lateness": report.lateness,
        "faults": report.faults.as_dict() if report.faults else None,
        "exit_status": report.exit_status,
    }


def write_plot(report: Report, path: str) -> None:
    """Throughput and latency percentiles over time, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Short runs get finer buckets, so that they show more than one or two steps.
    bucket = 1.0 if report.elapsed >= 10 else 0.1
    rows = timeseries(report.stats.booths, bucket_s=bucket)
    if rows:  # repeat the last bucket at its end, so that its step is drawn
        rows.append(dict(rows[-1], t=rows[-1]["t"] + bucket))
    t = [r["t"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    try:
        for key, label, style in (("requests", "all requests", "--"), ("ok", "200 sold", "-"),
                                  ("sold_out", "409 sold out", "-"), ("errors", "errors", "-")):
            top.plot(t, [r[key] / bucket for r in rows], style, label=label,
                     drawstyle="steps-post")
        top.set_ylabel("requests/s")
        top.set_title(f"ticketbooth load test: {describe_plan(report.plan)}", fontsize=9)
        top.legend(loc="best", fontsize=8)
        top.grid(alpha=0.3)
        for key in ("p50_ms", "p90_ms", "p99_ms"):
            bottom.plot(t, [r[key] for r in rows], label=key.removesuffix("_ms"),
                        drawstyle="steps-post")
        bottom.set_ylabel("latency (ms)")
        bottom.set_xlabel(f"seconds since start ({bucket:g} s buckets)")
        bottom.legend(loc="best", fontsize=8)
        bottom.grid(alpha=0.3)
        for at, kind in report.faults.times() if report.faults else ():
            for axis in (top, bottom):
                axis.axvline(at, color="red", alpha=0.4, linewidth=1)
            top.annotate(kind, (at, 1), xycoords=("data", "axes fraction"), fontsize=7,
                         color="red", rotation=90, va="top", ha="right")
        fig.tight_layout()
        fig.savefig(path, dpi=100, format="png")
    finally:
        plt.close(fig)


class Progress:
    """A tqdm progress bar, shown only when enabled (stdout a terminal, not quiet)."""

    def __init__(self, plan: LoadPlan, tickets_left: int, enabled: bool,
                 stream: IO[str] | None = None) -> None:
        self._bar: Any = None
        self._plan = plan
        if not enabled:
            return
        from tqdm import tqdm

        if plan.requests is not None:
            total, unit = float(plan.requests), "req"
        elif plan.duration is not None:
            total, unit = float(plan.duration), "s"
        else:
            total, unit = float(max(tickets_left, 0)), "ticket"
        # shutil falls back to 80x24 where the terminal reports no size (a fresh pty), on
        # which tqdm would otherwise show nothing.
        size = shutil.get_terminal_size((80, 24))
        self._bar = tqdm(total=total, unit=unit, file=stream, leave=False, ncols=size.columns,
                         nrows=size.lines)

    def update(self, requests: int, tickets: int, errors: int, elapsed: float) -> None:
        if self._bar is None:
            return
        plan = self._plan
        if plan.requests is not None:
            done = float(requests)
        elif plan.duration is not None:
            done = min(elapsed, plan.duration)
        else:
            done = float(tickets)
        self._bar.n = max(min(done, self._bar.total), 0.0)
        self._bar.set_postfix(requests=requests, errors=errors, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
