"""The bench's report: medians, ratios against their targets, a table, JSON and a chart.

Pure functions over the runs, so the arithmetic is easy to check: a measurement's figure
is the median over its repetitions (requests/s, and each of p50 and p99 on its own); a
ratio is the ratio of two medians taken in the same bench run.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import Run

__all__ = ["Check", "CheckSpec", "Measured", "evaluate", "format_markdown", "format_text",
           "write_chart"]

PASS, MISS, REPORT, NA = "PASS", "MISS", "report", "n/a"
#: An open loop that sent less than this share of its rate did not hold it: a shortfall
#: of even 2% leaves a backlog that grows all run long (0.1 s after 5 s).
RATE_HELD = 0.99
#: The p99 chart shows at least this much (ms), so that a 10 ms limit is in view.
P99_AXIS_MS = 12.0
#: The column of CPU time per sale.
PER_SALE = "CPU us/sale (service/db)"


@dataclass
class Measured:
    """One measurement and its runs (one per repetition)."""

    name: str
    title: str
    tool: str
    urls: int = 1
    runs: list[Run] = field(default_factory=list)
    note: str = ""
    #: Runs replaced by quieter ones (see :meth:`offer`).
    discarded: list[Run] = field(default_factory=list)
    #: Others' CPU (in CPUs) past which a run is called noisy.
    noise_limit: float = 0.1

    def offer(self, run: Run, keep: int) -> None:
        """Add a run; past ``keep`` runs, the noisiest (the latest of equals) is discarded.
        Only others' CPU decides, never the figures."""
        self.runs.append(run)
        if len(self.runs) > keep:
            worst = max(range(len(self.runs)), key=lambda i: (self.runs[i].noise, i))
            self.discarded.append(self.runs.pop(worst))

    @property
    def noisy(self) -> bool:
        """Some repetition kept ran while others took more CPU than the noise limit."""
        return any(r.noise > self.noise_limit for r in self.runs)

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs)

    def _median(self, figure: str) -> float | None:
        """The median of a :class:`Run` figure over the runs that have it."""
        used = [v for r in self.runs if (v := getattr(r, figure)) is not None]
        return statistics.median(used) if used else None

    @property
    def server_cpu(self) -> float | None:
        return self._median("server_cpu")

    @property
    def load_cpu(self) -> float | None:
        return self._median("load_cpu")

    @property
    def service_us_per_sale(self) -> float | None:
        return self._median("service_us_per_sale")

    @property
    def db_us_per_sale(self) -> float | None:
        return self._median("db_us_per_sale")

    @property
    def tickets_per_commit(self) -> float | None:
        return self._median("tickets_per_commit")

    @property
    def db_cpu(self) -> float | None:
        return self._median("db_cpu")

    @property
    def proxy_cpu(self) -> float | None:
        return self._median("proxy_cpu")

    def rate_shortfall(self) -> str:
        """For an open loop: why it is no measurement when the generator fell behind its
        rate in any repetition ("" when it kept up)."""
        for r in self.runs:
            if r.rate is not None and r.rps < RATE_HELD * r.rate:
                return (f"the generator could not send {r.rate:,.0f} req/s (it sent "
                        f"{r.rps:,.0f})")
        return ""

    @property
    def foreign_cpu(self) -> float | None:
        """The most CPU others took on the servers' CPU in any one repetition."""
        used = [r.foreign_cpu for r in self.runs if r.foreign_cpu is not None]
        return max(used) if used else None

    @property
    def foreign_load_cpu(self) -> float | None:
        """The most CPU others took on the load's CPU in any one repetition."""
        used = [r.foreign_load_cpu for r in self.runs if r.foreign_load_cpu is not None]
        return max(used) if used else None

    @property
    def noise(self) -> float:
        return max((r.noise for r in self.runs), default=0.0)

    def remarks(self) -> str:
        """What else the runs said: non-2xx answers, errors, failed checks, rates."""
        parts = [self.note] if self.note else []
        non_2xx = sum(r.non_2xx for r in self.runs)
        requests = sum(r.requests for r in self.runs)
        if non_2xx:
            parts.append(f"{non_2xx:,} of {requests:,} answers not 2xx")
        errors = sum(sum(r.errors.values()) for r in self.runs)
        if errors:
            kinds: dict[str, int] = {}
            for r in self.runs:
                for kind, n in r.errors.items():
                    kinds[kind] = kinds.get(kind, 0) + n
            parts.append("errors: " + ", ".join(f"{k} {n}" for k, n in kinds.items() if n))
        if self.tickets_per_commit is not None:
            parts.append(f"{self.tickets_per_commit:,.1f} tickets per commit")
        if self.noisy:
            parts.append(f"NOISY: others competed for up to {self.noise:.2f} CPU")
        if self.discarded:
            parts.append(f"{len(self.discarded)} noisier run(s) replaced")
        retries = sum(r.retries for r in self.runs)
        if retries:
            parts.append(f"{retries} run(s) redone after getting no answer")
        failed = sorted({c for r in self.runs for c in r.failed_checks})
        if failed:
            parts.append("checks failed: " + ", ".join(failed))
        rates = [r.rate for r in self.runs if r.rate is not None]
        if rates:
            parts.append(f"asked {statistics.median(rates):,.0f} req/s, got "
                         f"{self.rps:,.0f}")
        return "; ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "tool": self.tool, "urls": self.urls,
                "repetitions": len(self.runs),
                "median_rps": round(self.rps, 1) if self.runs else None,
                "min_rps": round(min(r.rps for r in self.runs), 1) if self.runs else None,
                "max_rps": round(max(r.rps for r in self.runs), 1) if self.runs else None,
                "p50_ms": round(self.p50_ms, 3) if self.runs else None,
                "p99_ms": round(self.p99_ms, 3) if self.runs else None,
                "server_cpu": self.server_cpu,
                "load_cpu": self.load_cpu,
                "db_cpu": self.db_cpu,
                "proxy_cpu": self.proxy_cpu,
                "service_us_per_sale": self.service_us_per_sale,
                "db_us_per_sale": self.db_us_per_sale,
                "tickets_per_commit": self.tickets_per_commit,
                "foreign_cpu_max": self.foreign_cpu,
                "foreign_load_cpu_max": self.foreign_load_cpu,
                "noise_max": round(self.noise, 3),
                "noisy": self.noisy,
                "remarks": self.remarks() if self.runs else "",
                "runs": [r.as_json() for r in self.runs],
                "discarded_runs": [r.as_json() for r in self.discarded]}


@dataclass(frozen=True)
class CheckSpec:
    """A ratio of two measurements' requests/s (``denominator`` set), or one measurement's
    p99 in ms; with a target it is PASS or MISS, without one it is only reported."""

    name: str
    title: str
    numerator: str
    denominator: str | None = None
    target: float | None = None
    #: For a p99: the same open loop against a bare WSGI counter, the generator's own p99.
    floor: str | None = None


@dataclass
class Check:
    spec: CheckSpec
    value: float | None
    verdict: str
    note: str = ""

    @property
    def unit(self) -> str:
        return "x" if self.spec.denominator else " ms"

    def shown_value(self) -> str:
        if self.value is None:
            return "-"
        return f"{self.value:.2f}x" if self.spec.denominator else f"{self.value:.2f} ms"

    def shown_target(self) -> str:
        if self.spec.target is None:
            return "(report)"
        return (f">= {self.spec.target:.2f}x" if self.spec.denominator
                else f"< {self.spec.target:g} ms")

    def as_json(self) -> dict[str, Any]:
        s = self.spec
        return {"name": s.name, "title": s.title, "kind": "ratio" if s.denominator else "p99",
                "numerator": s.numerator, "denominator": s.denominator,
                "value": None if self.value is None else round(self.value, 4),
                "target": s.target,
                "comparison": (">=" if s.denominator else "<") if s.target is not None else None,
                "verdict": self.verdict, "note": self.note}


def evaluate(specs: Iterable[CheckSpec], measured: dict[str, Measured]) -> list[Check]:
    checks = []
    for spec in specs:
        top = measured.get(spec.numerator)
        bottom = measured.get(spec.denominator) if spec.denominator else None
        if top is None or not top.runs or (spec.denominator and (bottom is None
                                                                 or not bottom.runs)):
            checks.append(Check(spec, None, NA))
            continue
        notes = []
        if bottom is not None:
            value = top.rps / bottom.rps if bottom.rps else 0.0
            ok = spec.target is None or value >= spec.target
        else:
            value = top.p99_ms
            ok = spec.target is None or value < spec.target
            floor = measured.get(spec.floor) if spec.floor else None
            if floor is not None and floor.runs:
                notes.append(f"generator floor p99 {floor.p99_ms:.2f} ms at the same rate")
        verdict = REPORT if spec.target is None else (PASS if ok else MISS)
        short = top.rate_shortfall()
        if short:
            # The generator fell behind: the latency is its own backlog, not the service's.
            verdict = NA
            notes.insert(0, f"not measured: {short}")
        checks.append(Check(spec, value, verdict, "; ".join(notes)))
    return checks


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 or i == len(cells) - 1 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
    return lines + [_row(r, widths) for r in rows]


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _per_sale(m: Measured) -> str:
    """CPU microseconds per sale: the service's, and PostgreSQL's after a slash."""
    if m.service_us_per_sale is None:
        return "-"
    shown = f"{m.service_us_per_sale:,.0f}"
    if m.db_us_per_sale is not None:
        shown += f"/{m.db_us_per_sale:,.0f}"
    return shown


def _others(m: Measured) -> str:
    shown = _cpu(m.foreign_cpu)
    if m.foreign_load_cpu is not None:
        shown += "/" + _cpu(m.foreign_load_cpu)
    return shown


def _measure_rows(measured: Iterable[Measured]) -> list[list[str]]:
    rows = []
    for m in measured:
        if not m.runs:
            continue
        low, high = min(r.rps for r in m.runs), max(r.rps for r in m.runs)
        seconds = statistics.median(r.seconds for r in m.runs)
        rows.append([m.title, m.tool, f"{m.rps:,.0f}", f"{len(m.runs)} x {seconds:.0f} s",
                     f"{low:,.0f}..{high:,.0f}",
                     f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}", _cpu(m.server_cpu),
                     _per_sale(m), _cpu(m.load_cpu), _others(m), m.remarks()])
    return rows


def format_text(measured: Iterable[Measured], checks: Sequence[Check]) -> str:
    header = ["measurement", "tool", "req/s (median)", "runs", "min..max", "p50 ms",
              "p99 ms", "service CPU", PER_SALE, "load CPU", "others' CPU (server/load)",
              "notes"]
    lines = _table(header, _measure_rows(measured))
    lines.append("")
    lines += _table(["target", "measured", "target", "verdict", "notes"],
                    [[c.spec.title, c.shown_value(), c.shown_target(), c.verdict, c.note]
                     for c in checks])
    return "\n".join(lines)


def format_markdown(measured: Iterable[Measured], checks: Sequence[Check]) -> str:
    lines = ["| measurement | tool | requests/s (median) | runs | min..max | p50 ms | "
             f"p99 ms | service CPU | {PER_SALE} | load CPU | others' CPU (server/load) | "
             "notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _measure_rows(measured)]
    lines += ["", "| ratio or limit | measured | target | verdict | notes |",
              "|---|---:|---:|---|---|"]
    lines += [f"| {c.spec.title} | {c.shown_value()} | {c.shown_target()} | {c.verdict} | "
              f"{c.note} |" for c in checks]
    return "\n".join(lines) + "\n"


def write_chart(path: Path, measured: Sequence[Measured], checks: Sequence[Check],
                title: str) -> None:
    """Requests/s per closed-loop measurement (bars: median, whiskers: min..max, red
    ticks: where a ratio's target puts the bar), and p99 at half the peak against its
    limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peaks = [m for m in measured if m.runs and all(r.rate is None for r in m.runs)]
    opens = [m for m in measured if m.runs and any(r.rate is not None for r in m.runs)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5),
                             width_ratios=[4, 1] if opens else [4, 0.01])
    ax = axes[0]
    names = [m.name for m in peaks]
    medians = [m.rps for m in peaks]
    lows = [m.rps - min(r.rps for r in m.runs) for m in peaks]
    highs = [max(r.rps for r in m.runs) - m.rps for m in peaks]
    colours = ["#999999" if "hello" in m.name else "#4c72b0" if m.tool == "wrk" else "#dd8452"
               for m in peaks]
    ax.bar(names, medians, yerr=[lows, highs], capsize=4, color=colours)
    for i, m in enumerate(peaks):
        ax.annotate(f"{m.rps:,.0f}", (i, m.rps), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    by_name = {m.name: m for m in peaks}
    labelled = False
    for check in checks:
        spec = check.spec
        if spec.denominator is None or spec.target is None:
            continue
        if spec.numerator not in by_name or spec.denominator not in by_name:
            continue
        x = names.index(spec.numerator)
        y = spec.target * by_name[spec.denominator].rps
        ax.hlines(y, x - 0.4, x + 0.4, colors="red", linewidth=2,
                  label=None if labelled else "target (ratio x the other measurement)")
        labelled = True
    ax.set_ylabel("requests/s (median; whiskers min..max)")
    ax.set_title("closed loop, 64 connections")
    ax.tick_params(axis="x", labelrotation=35)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
    if labelled:
        ax.legend(loc="upper right", fontsize=8)
    right = axes[1]
    if opens:
        bars = right.bar([m.name for m in opens], [m.p99_ms for m in opens],
                         color=["#999999" if m.name.startswith("floor") else "#55a868"
                                for m in opens])
        for i, (bar, m) in enumerate(zip(bars, opens, strict=True)):
            behind = bool(m.rate_shortfall())
            if behind:  # the generator fell behind: no measurement of the service
                bar.set_hatch("//")
                bar.set_alpha(0.5)
            right.annotate(f"{m.p99_ms:.1f} ms" + (" (n/a)" if behind else ""), (i, m.p99_ms),
                           textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
        limits = [c.spec.target for c in checks
                  if c.spec.denominator is None and c.spec.target is not None]
        if limits:
            right.axhline(limits[0], color="red", linewidth=2, label=f"limit {limits[0]:g} ms")
            right.legend(fontsize=8)
        if max(m.p99_ms for m in opens) > 100:
            right.set_yscale("log")
            right.set_ylim(top=max(m.p99_ms for m in opens) * 4)
        else:
            right.set_ylim(top=max(max(m.p99_ms for m in opens), P99_AXIS_MS) * 1.3)
        right.set_ylabel("p99 ms")
        right.set_title("p99 at half the peak rate")
        right.tick_params(axis="x", labelrotation=35)
    else:
        right.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
