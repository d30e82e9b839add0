"""``--processes P``: spread the booths over P worker processes.

One Python process runs its booths' request loops under one GIL; when the
generator itself needs more than a core, each worker process runs a share of
the booths with ``run_load``.  Booth ``i`` (0-based) goes to process
``i % P``; its URL and its open-loop slots are the ones it would have in a
single process, and all processes start at one common ``perf_counter`` time
(a system-wide monotonic clock), so the open-loop schedule is the same.  A
closed-loop ``--requests`` budget is split between the processes in
proportion to their booths.  The workers send their ``BoothStats`` back when
they are done; progress is shared through a small array they update every
tick.  For ``--csv`` they also send, every tick, the requests recorded since
the last one.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Barrier, Event
from typing import Any

from loadtest.booths import LoadPlan, LoadResult, run_load
from loadtest.csvout import Entry, NewEntries
from loadtest.stats import BoothStats

__all__ = ["run_load_processes", "split_budget"]

#: Seconds allowed for the worker processes to start (import, build their booths).
START_TIMEOUT = 60.0
#: Seconds from the moment every worker is ready to the common start.
START_LEAD = 0.05
#: Seconds to wait for a worker to exit after it has sent its result.
JOIN_TIMEOUT = 10.0
#: Slots per process in the progress array: requests, tickets, errors.
_FIELDS = 3


def split_budget(total: int | None, shares: Sequence[int]) -> list[int | None]:
    """Split ``total`` in proportion to ``shares`` (largest remainder; sums to total)."""
    if total is None:
        return [None] * len(shares)
    whole = sum(shares)
    exact = [total * s / whole for s in shares]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return list(parts)


def _worker(index: int, plan: LoadPlan, booth_ids: list[int], budget: int | None,
            ready: Barrier, go: Event, origin: Any, stop: Event, progress: SynchronizedArray[int],
            results: multiprocessing.Queue[tuple[str, Any]], stream: bool = False) -> None:
    """One worker process: wait for the common start, run its booths, send the result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        ready.wait(START_TIMEOUT)
        if not go.wait(START_TIMEOUT):
            return
        new_entries = NewEntries() if stream else None

        def publish(booths: Sequence[BoothStats], _elapsed: float) -> None:
            base = index * _FIELDS
            progress[base] = sum(b.requests for b in booths)
            progress[base + 1] = sum(b.tickets for b in booths)
            progress[base + 2] = sum(b.error_count for b in booths)
            if new_entries is not None and (entries := new_entries(booths)):
                results.put(("entries", entries))

        result = run_load(plan, on_tick=publish, booth_ids=booth_ids, budget=budget,
                          origin=origin.value, should_stop=stop.is_set)
        publish(result.booths, 0.0)
        results.put(("ok", result))
    except BaseException as exc:  # reported by the parent
        results.put(("error", f"booth process {index + 1}: {type(exc).__name__}: {exc}"))


def _collect(kind: str, payload: Any, got: list[LoadResult], errors: list[str],
             on_entries: Callable[[list[Entry]], None] | None) -> None:
    if kind == "ok":
        got.append(payload)
    elif kind == "entries":
        if on_entries is not None:
            on_entries(payload)
    else:
        errors.append(payload)


def run_load_processes(plan: LoadPlan,
                       on_tick: Callable[[int, int, int, float], None] | None = None,
                       tick_s: float = 0.2,
                       on_entries: Callable[[list[Entry]], None] | None = None) -> LoadResult:
    """Like ``run_load`` over ``plan.processes`` worker processes.

    ``on_tick(requests, tickets, errors, elapsed)`` reports progress;
    ``on_entries(entries)`` is handed the requests the workers recorded, as they
    send them (before their results).  Ctrl-C asks the workers to stop and
    returns what they did, ``interrupted`` set.
    """
    count = min(plan.processes, plan.booths)
    ctx = multiprocessing.get_context("spawn")
    ids = [list(range(p, plan.booths, count)) for p in range(count)]
    budgets = split_budget(plan.requests if not plan.rate else None, [len(i) for i in ids])
    ready, go, stop = ctx.Barrier(count + 1), ctx.Event(), ctx.Event()
    origin = ctx.Value("d", 0.0)
    progress = ctx.Array("q", count * _FIELDS)
    results: multiprocessing.Queue[tuple[str, Any]] = ctx.Queue()
    procs = [ctx.Process(target=_worker, name=f"booths-{p + 1}", daemon=True,
                         args=(p, plan, ids[p], budgets[p], ready, go, origin, stop, progress,
                               results, on_entries is not None))
             for p in range(count)]
    for proc in procs:
        proc.start()
    got: list[LoadResult] = []
    errors: list[str] = []
    interrupted = False
    try:
        try:
            ready.wait(START_TIMEOUT)
        except Exception as exc:  # BrokenBarrierError: a worker died or did not start in time
            raise RuntimeError("the booth processes did not start") from exc
        origin.value = time.perf_counter() + START_LEAD
        go.set()
        last_tick = time.perf_counter()
        while len(got) + len(errors) < count:
            try:
                kind, payload = results.get(timeout=tick_s)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    codes = [p.exitcode for p in procs]
                    raise RuntimeError(f"booth processes died (exit codes {codes})") from None
            else:
                _collect(kind, payload, got, errors, on_entries)
            # Every tick, also while entries keep the queue busy.
            if on_tick is not None and time.perf_counter() - last_tick >= tick_s:
                last_tick = time.perf_counter()
                totals = [sum(progress[p * _FIELDS + f] for p in range(count))
                          for f in range(_FIELDS)]
                on_tick(totals[0], totals[1], totals[2], last_tick - origin.value)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        deadline = time.monotonic() + plan.timeout + JOIN_TIMEOUT
        while len(got) + len(errors) < count and time.monotonic() < deadline:
            try:
                kind, payload = results.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            _collect(kind, payload, got, errors, on_entries)
    finally:
        stop.set()
        for proc in procs:
            proc.join(JOIN_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join(JOIN_TIMEOUT)
        results.close()
        results.join_thread()
    if errors:
        raise RuntimeError("; ".join(errors))
    booths = sorted((b for r in got for b in r.booths), key=lambda b: b.booth)
    return LoadResult(booths=booths, elapsed=max((r.elapsed for r in got), default=0.0),
                      interrupted=interrupted or any(r.interrupted for r in got))
