"""``--stages``: an arrival rate that ramps linearly from stage to stage (pure arithmetic).

A stage ``30s:2000`` ramps the arrival rate linearly, over 30 seconds, from
the rate the previous stage ended at (the first from ``--start-rate``) to
2000 requests per second, as k6's ``ramping-arrival-rate`` does.  The number
of requests due by time ``t`` is the integral of the rate, ``N(t)``; request
``k`` (0-based, across all booths) is due when ``N(t) = k``.  So a plateau at
``r`` sends at ``k / r``, exactly as ``--rate r`` does, and the run holds the
requests ``k < N(total)``.  Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import pairwise

__all__ = ["Schedule", "Stage", "format_duration", "parse_duration", "parse_stages"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh])\s*$")
#: Decimal places ``N(t)`` is rounded to before counting the requests due, so that a stage
#: holding a whole number of requests does not gain one by floating-point error.
_ROUND = 9


def parse_duration(text: str) -> float:
    """``"10s"``, ``"1.5m"``, ``"2h"`` in seconds; ValueError for anything else or 0."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration with a unit s, m or h: {text.strip()!r}")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"a stage must last more than 0 s: {text.strip()!r}")
    return seconds


def format_duration(seconds: float) -> str:
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Stage:
    """One stage: over ``duration`` seconds the rate ramps linearly to ``target`` per second."""

    duration: float
    target: float

    def __str__(self) -> str:
        return f"{format_duration(self.duration)}:{self.target:g}"


def parse_stages(text: str) -> tuple[Stage, ...]:
    """``"10s:100,30s:2000,10s:0"`` as stages; ValueError naming the stage that is wrong."""
    stages = []
    for number, part in enumerate(text.split(","), 1):
        where = f"stage {number} ({part.strip()!r})"
        duration_text, colon, rate_text = part.partition(":")
        if not colon:
            raise ValueError(f"{where}: not DURATION:RATE, e.g. 30s:2000")
        try:
            duration = parse_duration(duration_text)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        try:
            target = float(rate_text)
        except ValueError:
            raise ValueError(f"{where}: the rate is not a number: {rate_text.strip()!r}") from None
        if not math.isfinite(target) or target < 0:
            raise ValueError(f"{where}: the rate must be a finite number 0 or more")
        stages.append(Stage(duration, target))
    return tuple(stages)


@dataclass(frozen=True)
class Schedule:
    """The stages from a start rate, and when each request of the run is due."""

    stages: tuple[Stage, ...]
    start_rate: float = 0.0
    #: Seconds since the start at which each stage begins, and one more: the end.
    bounds: tuple[float, ...] = field(init=False, repr=False, compare=False)
    #: ``N`` at each bound: the requests due (as a real number) by then.
    due: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("no stages")
        bounds, due = [0.0], [0.0]
        for stage, begin in zip(self.stages, self.start_rates, strict=True):
            bounds.append(bounds[-1] + stage.duration)
            due.append(due[-1] + (begin + stage.target) / 2 * stage.duration)
        object.__setattr__(self, "bounds", tuple(bounds))
        object.__setattr__(self, "due", tuple(due))

    @property
    def start_rates(self) -> tuple[float, ...]:
        """The rate each stage starts from: the previous stage's target."""
        return (self.start_rate, *(s.target for s in self.stages[:-1]))

    @property
    def duration(self) -> float:
        return self.bounds[-1]

    @property
    def total(self) -> int:
        """Requests in the whole run."""
        return self._count(self.due[-1])

    def scheduled(self) -> list[int]:
        """Requests due in each stage (they sum to ``total``)."""
        counts = [self._count(n) for n in self.due]
        return [b - a for a, b in pairwise(counts)]

    def rate_at(self, t: float) -> float:
        """The target arrival rate ``t`` seconds after the start (0 after the end)."""
        if t < 0 or t >= self.duration:
            return 0.0
        i = bisect_right(self.bounds, t) - 1
        begin, stage = self.start_rates[i], self.stages[i]
        return begin + (stage.target - begin) * (t - self.bounds[i]) / stage.duration

    def send_time(self, k: int) -> float:
        """Seconds after the start at which request ``k`` (0-based) is due: ``N(t) = k``."""
        if not 0 <= k < self.total:
            raise IndexError(f"request {k} is not in the schedule of {self.total}")
        i = min(bisect_right(self.due, k) - 1, len(self.stages) - 1)
        stage, begin = self.stages[i], self.start_rates[i]
        m = k - self.due[i]  # requests due since the stage began
        if m <= 0:
            return self.bounds[i]
        # Within the stage N = begin*u + c*u^2 with c = (target - begin) / (2 * duration);
        # this root of it keeps its precision whatever the sign of c (and is u = m / begin
        # on a plateau, c = 0).
        c = (stage.target - begin) / (2 * stage.duration)
        root = math.sqrt(max(begin * begin + 4 * c * m, 0.0))
        u = 2 * m / (begin + root)
        return self.bounds[i] + min(u, stage.duration)

    def stage_of(self, t: float) -> int:
        """The index of the stage that time ``t`` (seconds since the start) falls in."""
        return min(max(bisect_right(self.bounds, t) - 1, 0), len(self.stages) - 1)

    def describe(self) -> str:
        start = f"from {self.start_rate:g}/s: " if self.start_rate else ""
        return f"stages {start}{','.join(str(s) for s in self.stages)}"

    @staticmethod
    def _count(n: float) -> int:
        """Requests ``k`` with ``k < n``."""
        return math.ceil(round(n, _ROUND))
