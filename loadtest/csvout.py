"""``--csv PATH``: the time series written as the run goes, one row per second.

The columns are the JSON ``timeseries``' columns.  A second's row is written
(and flushed) once that second is over, plus a short grace for requests
completed in it but not yet recorded; the rest are written at the end of the
run.  So the file can be followed with ``tail -f``, and a run that crashes
still leaves every finished second behind.  (A request recorded later than
the grace, after its second's row was written, counts in the next row.)

The booths write their ``BoothStats`` while this reads them, without a lock:
``BoothStats.record`` appends the completion time, then the latency, then the
outcome, so the outcomes' length counts the requests recorded in full.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from typing import IO

from loadtest.stats import TIMESERIES_COLUMNS, BoothStats, bucket_row

__all__ = ["CsvStream", "Entry", "NewEntries"]

#: One recorded request: completion time (s since the start), latency (us), outcome.
Entry = tuple[float, int, int]

#: Seconds after a second's end before its row is written: a booth records its request just
#: after it reads the clock, so a request completed in that second may still be on its way.
GRACE_S = 0.5


class NewEntries:
    """The requests the booths recorded since the last call, booth by booth."""

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def __call__(self, booths: Sequence[BoothStats]) -> list[Entry]:
        out: list[Entry] = []
        for b in booths:
            start, end = self._seen.get(b.booth, 0), len(b.outcome)
            if end > start:
                out += zip(b.done_at[start:end], b.latency_us[start:end], b.outcome[start:end],
                           strict=True)
                self._seen[b.booth] = end
        return out


class CsvStream:
    """Writes the per-second rows of the entries fed to it."""

    def __init__(self, path: str, bucket_s: float = 1.0) -> None:
        self._file: IO[str] = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=TIMESERIES_COLUMNS)
        self._writer.writeheader()
        self._file.flush()
        self._bucket_s = bucket_s
        self._pending: dict[int, list[tuple[int, int]]] = {}
        self._next = 0  # the first bucket not written yet

    def add(self, entries: Iterable[Entry]) -> None:
        """Take newly recorded requests."""
        for done_at, latency_us, outcome in entries:
            index = max(int(done_at // self._bucket_s), self._next)
            self._pending.setdefault(index, []).append((latency_us, outcome))

    def tick(self, elapsed: float) -> None:
        """Write the rows of the seconds over ``elapsed`` seconds into the run."""
        self._write_until(int((elapsed - GRACE_S) // self._bucket_s))

    def close(self) -> None:
        """Write every row left and close the file."""
        try:
            if self._pending:
                self._write_until(max(self._pending) + 1)
        finally:
            self._file.close()

    def _write_until(self, end: int) -> None:
        if end <= self._next:
            return
        for index in range(self._next, end):
            self._writer.writerow(bucket_row(index, self._bucket_s,
                                             self._pending.pop(index, [])))
        self._next = end
        self._file.flush()
