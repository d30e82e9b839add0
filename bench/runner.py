"""``make bench`` (``python -m bench``): every store against the stack's own ceilings.

In one run, side by side, at the same concurrency (64 connections), it measures

1. a bare WSGI hello and 2. a Flask hello, both served by the service's own waitress
   settings (``bench/hello.py``): the ceilings of the stack and of the framework;
3. ``POST /buy`` on the memory, SQLite (durable) and PostgreSQL stores, PostgreSQL with one
   and with two instances, connected directly and through a TCP proxy that delays every
   chunk by 1 ms each way (``bench/delayproxy.py``: a database on another machine), and
   through the same proxy at 0 ms (its own cost), and the memory store with two instances
   (two processes on one CPU, nothing shared);
4. ``POST /buy`` with a fresh ``Idempotency-Key`` on every request, on each store;
5. ``POST /buy`` with a stock of 100 and of 1,000,000;
6. ``ticketbooth-load`` against the memory store, next to wrk on the same server;
7. p99 latency at a constant rate of half the memory and SQLite peaks (open loop,
   ``ticketbooth-load --rate``, latency from each request's intended send time), next to
   the same open loop against a bare WSGI counter: the generator's own floor.

Every server runs with the production features on: the default plain access log
(to a file), Prometheus metrics and idempotency support. All servers are started first and
stay up; the repetitions are interleaved (repetition 1 of every measurement, then
repetition 2, ...) so that a noisy neighbour on this shared machine hits every measurement
alike. The closed loops make many short repetitions (15 of 1 s), so that each measurement's
median is taken over the same mix of the machine's moments; the open loops, which need a
few seconds to settle at their rate, fewer longer ones (3 of 5 s). The servers (and
PostgreSQL) are pinned to one CPU and the load to the other where the machine allows.
Each run also records the CPU the service, PostgreSQL and the load used (and per sale),
and the CPU other users of the machine took on the bench's CPUs; a run they disturbed is
redone (bounded), and a measurement still disturbed is marked NOISY.

It prints a table and every ratio next to its target with PASS or MISS, and writes
``OUT/bench.json`` (every figure), ``OUT/bench.md`` (the tables in Markdown) and
``OUT/bench.png``. Exit status: 0 the bench ran (whatever the verdicts: it is a report),
2 it could not run (usage, wrk or PostgreSQL missing, a server that would not start),
130 interrupted. Every process it starts is stopped (SIGTERM, bounded waits) on the way
out, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.load import (
    WRK_THREADS,
    NoAnswer,
    Run,
    port_of,
    run_ticketbooth_load,
    run_wrk,
    wrk_version,
)
from bench.procs import (
    BenchError,
    Pinning,
    ServerProcess,
    detect_pinning,
    filesystem_of,
    tree_cpu_seconds,
    user_cpu_seconds,
)
from bench.report import (
    Check,
    CheckSpec,
    Measured,
    evaluate,
    format_markdown,
    format_text,
    write_chart,
)
from loadtest.argtypes import non_negative_float, non_negative_int, positive_int

__all__ = ["CHECKS", "MEASUREMENTS", "SERVERS", "main", "run"]

PROG = "python -m bench"
EXIT_OK, EXIT_CANNOT_RUN, EXIT_INTERRUPTED = 0, 2, 130

#: A stock nothing can sell out during a bench.
BIG_STOCK = 10**12
#: The p99 limit at half the peak rate.
P99_LIMIT_MS = 10.0
#: Times a run that got no answer at all is redone before the bench gives up.
MAX_RETRIES = 2
#: Extra runs that may replace noisy ones in one bench (each as long as the run it redoes).
NOISE_BUDGET = 16
#: Closed loops: many short repetitions, interleaved across the measurements. This shared
#: machine's speed swings by up to 2x from one second to the next and drifts over tens of
#: seconds, so that a few long runs of two measurements met different machines; short
#: ones spread over the whole bench meet the same mix (docs/performance.md).
REPEAT = 15
DURATION_S = 1
#: Open loops: a few longer runs, since an open loop needs time to settle at its rate.
OPEN_REPEAT = 3
OPEN_DURATION_S = 5
#: Measurements a --smoke run makes.
SMOKE = ("flask-hello", "memory")
#: The delay proxy's delay each way, in ms: a database on another machine nearby.
PROXY_DELAY_MS = 1.0


@dataclass(frozen=True)
class ServerSpec:
    """A server to start: a hello app (``wsgi``, ``flask``) or the service with a store.

    ``store`` is ``memory``, ``sqlite:NAME`` (a fresh file in the work folder) or
    ``postgres:N`` (the N-th fresh database in the bench's PostgreSQL server). With
    ``delay_ms``, a PostgreSQL store is reached through the bench's delay proxy
    (``bench/delayproxy.py``) delaying every chunk by that many ms each way."""

    kind: str
    store: str = "memory"
    tickets: int = BIG_STOCK
    delay_ms: float | None = None

    @property
    def on_postgres(self) -> bool:
        return self.store.startswith("postgres:")


SERVERS: dict[str, ServerSpec] = {
    "wsgi-hello": ServerSpec("wsgi"),
    "flask-hello": ServerSpec("flask"),
    "memory": ServerSpec("service"),
    "memory-2a": ServerSpec("service"),
    "memory-2b": ServerSpec("service"),
    "sqlite": ServerSpec("service", "sqlite:sqlite"),
    "postgres-1": ServerSpec("service", "postgres:1"),
    "postgres-2a": ServerSpec("service", "postgres:2"),
    "postgres-2b": ServerSpec("service", "postgres:2"),
    "postgres-proxy-1": ServerSpec("service", "postgres:3", delay_ms=PROXY_DELAY_MS),
    "postgres-proxy0-1": ServerSpec("service", "postgres:4", delay_ms=0.0),
    "postgres-proxy-2a": ServerSpec("service", "postgres:5", delay_ms=PROXY_DELAY_MS),
    "postgres-proxy-2b": ServerSpec("service", "postgres:5", delay_ms=PROXY_DELAY_MS),
    "postgres-1-keys": ServerSpec("service", "postgres:6"),
    "stock-100": ServerSpec("service", tickets=100),
    "stock-1m": ServerSpec("service", tickets=1_000_000),
    "memory-keys": ServerSpec("service"),
    "sqlite-keys": ServerSpec("service", "sqlite:sqlite-keys"),
    "floor": ServerSpec("booth"),
}


@dataclass(frozen=True)
class Measurement:
    name: str
    title: str
    servers: tuple[str, ...]
    tool: str = "wrk"
    keyed: bool = False
    #: wrk sends the request a ticketbooth-load booth sends (a JSON body), not an empty POST.
    as_booths: bool = False
    #: Open loop at half this measurement's median requests/s (run after every peak).
    half_peak_of: str | None = None
    note: str = ""


MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("wsgi-hello", "bare WSGI hello (waitress)", ("wsgi-hello",)),
    Measurement("flask-hello", "Flask hello (waitress)", ("flask-hello",)),
    Measurement("memory", "POST /buy, memory", ("memory",)),
    Measurement("memory-as-booths", "POST /buy, memory, the booths' request", ("memory",),
                as_booths=True,
                note="body {\"quantity\": 1} as ticketbooth-load sends; same server as 'memory'"),
    Measurement("load-memory", "POST /buy, memory, by ticketbooth-load", ("memory",),
                tool="ticketbooth-load", note="--booths 64, same server as 'memory'"),
    Measurement("memory-2", "POST /buy, memory, 2 instances", ("memory-2a", "memory-2b"),
                note="32 connections to each instance, a stock each: nothing shared"),
    Measurement("sqlite", "POST /buy, SQLite (durable)", ("sqlite",)),
    Measurement("postgres-1", "POST /buy, PostgreSQL, 1 instance", ("postgres-1",)),
    Measurement("postgres-2", "POST /buy, PostgreSQL, 2 instances",
                ("postgres-2a", "postgres-2b"), note="32 connections to each instance"),
    Measurement("postgres-proxy-1", "POST /buy, PostgreSQL 1 ms away, 1 instance",
                ("postgres-proxy-1",), note="through the delay proxy, 1 ms each way"),
    Measurement("postgres-proxy0-1", "POST /buy, PostgreSQL via the proxy at 0 ms, 1 instance",
                ("postgres-proxy0-1",), note="through the delay proxy, no delay: its own cost"),
    Measurement("postgres-proxy-2", "POST /buy, PostgreSQL 1 ms away, 2 instances",
                ("postgres-proxy-2a", "postgres-proxy-2b"),
                note="through one delay proxy, 1 ms each way; 32 connections to each instance"),
    Measurement("stock-100", "POST /buy, memory, stock 100", ("stock-100",),
                note="its 100 tickets sell in the first milliseconds: then every answer is 409"),
    Measurement("stock-1m", "POST /buy, memory, stock 1,000,000", ("stock-1m",)),
    Measurement("memory-keys", "POST /buy, memory, Idempotency-Key", ("memory-keys",),
                keyed=True, note="a new key on every request"),
    Measurement("sqlite-keys", "POST /buy, SQLite, Idempotency-Key", ("sqlite-keys",),
                keyed=True, note="a new key on every request"),
    Measurement("postgres-1-keys", "POST /buy, PostgreSQL, 1 instance, Idempotency-Key",
                ("postgres-1-keys",), keyed=True, note="a new key on every request"),
    Measurement("p99-memory", "POST /buy, memory, half the peak rate", ("memory",),
                tool="ticketbooth-load", half_peak_of="memory"),
    Measurement("p99-sqlite", "POST /buy, SQLite, half the peak rate", ("sqlite",),
                tool="ticketbooth-load", half_peak_of="sqlite"),
    Measurement("floor-memory", "generator floor at the memory rate", ("floor",),
                tool="ticketbooth-load", half_peak_of="memory",
                note="bare WSGI counter, same rate as p99-memory"),
    Measurement("floor-sqlite", "generator floor at the SQLite rate", ("floor",),
                tool="ticketbooth-load", half_peak_of="sqlite",
                note="bare WSGI counter, same rate as p99-sqlite"),
)
_BY_NAME = {m.name: m for m in MEASUREMENTS}

CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("memory-vs-flask", "memory /buy vs Flask hello", "memory", "flask-hello", 0.95),
    CheckSpec("memory-vs-wsgi", "memory /buy vs bare WSGI hello (distance to the limit)",
              "memory", "wsgi-hello"),
    CheckSpec("flask-vs-wsgi", "Flask hello vs bare WSGI hello", "flask-hello", "wsgi-hello"),
    CheckSpec("sqlite-vs-memory", "SQLite /buy vs memory /buy", "sqlite", "memory", 0.8),
    CheckSpec("stock-1m-vs-100", "stock 1,000,000 vs stock 100 (sold out)", "stock-1m",
              "stock-100", 0.95),
    CheckSpec("stock-big-vs-1m", "stock 10^12 vs stock 1,000,000 (both selling)", "memory",
              "stock-1m"),
    CheckSpec("load-vs-wrk", "ticketbooth-load vs wrk, memory /buy, the same request",
              "load-memory", "memory-as-booths", 0.8),
    CheckSpec("postgres-vs-sqlite", "PostgreSQL /buy (1 instance) vs SQLite /buy",
              "postgres-1", "sqlite", 0.7),
    CheckSpec("postgres-proxy-vs-direct", "PostgreSQL 1 ms away vs connected directly "
              "(1 instance)", "postgres-proxy-1", "postgres-1", 0.8),
    CheckSpec("postgres-proxy0-vs-direct", "PostgreSQL via the proxy at 0 ms vs directly "
              "(the proxy's own cost)", "postgres-proxy0-1", "postgres-1"),
    CheckSpec("postgres-proxy-vs-proxy0", "PostgreSQL via the proxy at 1 ms vs at 0 ms "
              "(the delay's cost)", "postgres-proxy-1", "postgres-proxy0-1"),
    CheckSpec("postgres-2-vs-1", "PostgreSQL 2 instances vs 1", "postgres-2", "postgres-1",
              0.95),
    CheckSpec("memory-2-vs-1", "memory 2 instances vs 1 (two processes on one CPU, nothing "
              "shared)", "memory-2", "memory"),
    CheckSpec("postgres-proxy-2-vs-1", "PostgreSQL 1 ms away, 2 instances vs 1",
              "postgres-proxy-2", "postgres-proxy-1", 0.95),
    CheckSpec("memory-keys-vs-memory", "memory /buy with keys vs without", "memory-keys",
              "memory", 0.8),
    CheckSpec("sqlite-keys-vs-sqlite", "SQLite /buy with keys vs without", "sqlite-keys",
              "sqlite", 0.8),
    CheckSpec("postgres-keys-vs-postgres", "PostgreSQL /buy with keys vs without (1 instance)",
              "postgres-1-keys", "postgres-1", 0.8),
    CheckSpec("p99-memory", "p99 at half the peak, memory", "p99-memory", target=P99_LIMIT_MS,
              floor="floor-memory"),
    CheckSpec("p99-sqlite", "p99 at half the peak, SQLite", "p99-sqlite", target=P99_LIMIT_MS,
              floor="floor-sqlite"),
)

METHOD_NOTES = (
    "Closed loop: wrk -t2 -c64 (64 connections, each sends its next request when it has its "
    "answer), POST /buy with no body (one ticket); the hello apps get the same request. "
    "ticketbooth-load's booths send a JSON body ({\"quantity\": 1}), which costs the server "
    "more (waitress buffers a body; the app parses it), so the generator is compared with "
    "wrk sending that same request (memory-as-booths), not with the empty POST.",
    "Figures are medians over the repetitions (requests/s, p50 and p99 each on its own); "
    "ratios are ratios of medians from this one run. Repetitions are interleaved across "
    "measurements, each round in another order, after one warm-up run per server. Closed "
    "loops run many short repetitions (--repeat, --duration), since this machine's speed "
    "swings from one second to the next: short runs spread over the whole bench meet the "
    "same mix of it; open loops run a few longer ones (--open-repeat, --open-duration), "
    "since an open loop needs time to settle at its rate.",
    "Every service runs `ticketbooth serve` with its defaults: 4 waitress threads, the plain "
    "access log (stderr, to a file in OUT/logs/), Prometheus metrics, idempotency support; "
    "requests carry no Idempotency-Key except in the *-keys rows.",
    "stock-100 sells its 100 tickets in the first milliseconds of its warm-up, so what is "
    "measured is the sold-out answer at a stock of 100 (the store's check under its lock, "
    "no sale). stock-1m >= 0.95x stock-100 thus says a sale at a stock of a million costs "
    "at most 5% more than the cheapest answer at a stock of 100; stock 10^12 vs 1,000,000 "
    "compares sales with sales.",
    "PostgreSQL is durable (fsync on, synchronous_commit on, full_page_writes on) and runs "
    "on the servers' CPU; two instances are two service processes on one database, both on "
    "the servers' CPU, wrk's two threads each driving 32 connections to one of them. Each "
    "PostgreSQL row has its own database (so its own stock row) in the one server; "
    "postgres-1-keys is postgres-1's request with a new Idempotency-Key on each, as in the "
    "other *-keys rows (the same wrk script). Each PostgreSQL row's notes give its tickets "
    "per commit: the rows its sales table gained in a run (one per batch that sold) divided "
    "into their tickets (median), counted outside the CPU counts. memory-2 is two "
    "memory-store instances, a stock each, 32 connections to each: what two service "
    "processes on one CPU cost with nothing shared.",
    "postgres-proxy-*: the service reaches PostgreSQL through the bench's delay proxy "
    "(bench/delayproxy.py, its own process, pinned to the load's CPU like wrk: it "
    "stands for the network, not for either machine). Per connection and per direction, one "
    "thread stamps each chunk it reads with its arrival time (the kernel's) plus D and "
    "forwards the chunks in order, each no sooner than its stamp, waiting with select to "
    "the microsecond; "
    "reading goes on while chunks wait, so D is added to every message's latency without "
    "limiting throughput. postgres-proxy-1: one "
    "instance, D = 1 ms (a round trip 2 ms longer, as to a database on another machine "
    "nearby); postgres-proxy-2: two instances through that same proxy; postgres-proxy0-1: "
    "one instance, D = 0: the proxy's own cost (an extra hop through a Python process), "
    "so that postgres-proxy-1 vs postgres-proxy0-1 is the cost of the delay alone. The "
    "target compares postgres-proxy-1 with postgres-1 (the same configuration, no proxy).",
    "service CPU: CPUs the measured service process(es) used during a run (median; 1.00 is "
    "one CPU all the time; PostgreSQL's own processes are not in it). CPU us/sale: CPU "
    "microseconds per sale (2xx answer), the service process(es), then after the slash "
    "PostgreSQL's processes (the postmaster and all its children: backends, WAL writer, "
    "checkpointer...), each CPU time over the run divided by the run's sales (median). "
    "load CPU: the same for the load generator, the delay proxy's included (the JSON has "
    "the proxy's own as proxy_cpu, and PostgreSQL's CPUs as db_cpu). others' CPU "
    "(server/load): the most CPU that processes outside the bench (other users of this "
    "shared machine) took on the servers' CPU and on the load's CPU in any one repetition: "
    "each CPU's user time in /proc/stat less the user time of the bench's own processes "
    "there, the delay proxy's on the load's CPU (kernel time done while a CPU would idle is "
    "charged to no process, so it is left out on both sides).",
    "A run is noisy when others took more than the noise limit (0.1 CPU by default) on the "
    "servers' CPU, or on the load's CPU while it was full (generator and others above 0.9 "
    "CPU). After the repetitions, each measurement with a noisy run gets one more run, "
    "round after round, up to 16 extra runs per bench (--noise-redos), and keeps its "
    "quietest runs (by others' CPU, never by the figures; the others are listed as "
    "discarded in the JSON). "
    "Measurements still noisy are marked NOISY.",
    "p99 at half the peak: ticketbooth-load --rate R --booths 64 (open loop, latency from "
    "each request's intended send time, so coordinated omission is corrected); Debian has "
    "no wrk2 package. Its p50/p99 are from its HdrHistogram; wrk's from its own. The same "
    "open loop at the same rate against a bare WSGI counter (floor-*) gives the generator's "
    "own floor. An open loop that sent less than 99% of its rate in any repetition did not "
    "hold it: its backlog grew all run long, so its latency is the generator's, and its "
    "verdict is n/a.",
)





def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmark ticketbooth against the stack's own ceilings (a bare WSGI "
                    "hello and a Flask hello on the same waitress settings), every store, "
                    "two PostgreSQL instances, PostgreSQL 1 ms away through a delay proxy, "
                    "keyed and keyless buys, a small and a large stock, ticketbooth-load "
                    "against wrk, and p99 at half the peak rate; print each ratio next to "
                    "its target with PASS or MISS, and the CPU per sale.",
        epilog="Exit status: 0 the bench ran (MISSes included: it is a report), 2 it could "
               "not run, 130 interrupted. Measurements: "
               + ", ".join(m.name for m in MEASUREMENTS) + ".")
    p.add_argument("--repeat", type=positive_int, default=REPEAT, metavar="N",
                   help="repetitions of every closed-loop measurement; the median is "
                        f"reported (default {REPEAT})")
    p.add_argument("--duration", type=positive_int, default=DURATION_S, metavar="SECONDS",
                   help="seconds of load per closed-loop repetition, whole seconds "
                        f"(default {DURATION_S})")
    p.add_argument("--open-repeat", type=positive_int, default=OPEN_REPEAT, metavar="N",
                   help="repetitions of every open loop (p99 at half the peak rate and its "
                        f"generator floor); the median is reported (default {OPEN_REPEAT})")
    p.add_argument("--open-duration", type=positive_int, default=OPEN_DURATION_S,
                   metavar="SECONDS",
                   help="seconds of load per open-loop repetition, whole seconds (default "
                        f"{OPEN_DURATION_S}): an open loop needs a few seconds to hold its "
                        "rate")
    p.add_argument("--warmup", type=non_negative_int, default=1, metavar="SECONDS",
                   help="seconds of unrecorded load on each server before its first "
                        "repetition (default 1; 0 for none)")
    p.add_argument("--connections", type=positive_int, default=64, metavar="N",
                   help=f"concurrent connections (wrk -c, ticketbooth-load --booths); a "
                        f"multiple of {WRK_THREADS} (default 64)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                   help="folder for bench.json, bench.md, bench.png, the servers' logs "
                        "(logs/) and scratch files (default bench-results)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=[m.name for m in MEASUREMENTS],
                   help="run only these measurements (a p99-* or floor-* one brings the "
                        "peak whose half is its rate); "
                        "ratios missing a side are n/a. Names: "
                        + ", ".join(m.name for m in MEASUREMENTS))
    p.add_argument("--smoke", action="store_true",
                   help="a quick check that the bench works: 1 repetition of 1 s, no "
                        "warm-up, no extra runs, only " + " and ".join(SMOKE)
                        + " unless --only is given; its figures mean nothing")
    p.add_argument("--noise-limit", type=non_negative_float, default=0.1, metavar="CPUS",
                   help="a run during which other processes (not the bench's) took more than "
                        "this much CPU of the bench's CPUs is noisy (default 0.1)")
    p.add_argument("--noise-redos", type=non_negative_int, default=NOISE_BUDGET,
                   metavar="N",
                   help="extra runs the bench may make, after the repetitions, of measurements "
                        "with a noisy run; each keeps its --repeat (or --open-repeat) quietest "
                        "runs (default "
                        f"{NOISE_BUDGET}; 0: never)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin servers and load to separate CPUs with taskset")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.connections % WRK_THREADS:
        parser.error(f"--connections must be a multiple of {WRK_THREADS} (wrk's threads)")
    if args.smoke:
        args.repeat, args.duration, args.warmup, args.noise_redos = 1, 1, 0, 0
        args.open_repeat, args.open_duration = 1, 1
        args.only = args.only or list(SMOKE)
    return args


def selected_measurements(only: Sequence[str] | None) -> list[Measurement]:
    """The measurements to make, in table order; a p99 run brings the peak it halves."""
    if not only:
        return list(MEASUREMENTS)
    names = set(only)
    for name in only:
        peak = _BY_NAME[name].half_peak_of
        if peak:
            names.add(peak)
    return [m for m in MEASUREMENTS if m.name in names]


def _server_command(spec: ServerSpec, work: Path, databases: dict[str, str],
                    proxies: dict[float, int]) -> list[str]:
    if spec.kind in ("wsgi", "flask", "booth"):
        return [sys.executable, "-m", "bench.hello", spec.kind, "--port", "0"]
    store = spec.store
    if store.startswith("sqlite:"):
        store = f"sqlite:///{work / (store.split(':', 1)[1] + '.db')}"
    elif spec.on_postgres:
        store = databases[store]
        if spec.delay_ms is not None:  # the same database, through the proxy's port
            parts = urlsplit(store)
            store = urlunsplit(parts._replace(
                netloc=f"{parts.username}@127.0.0.1:{proxies[spec.delay_ms]}"))
    return [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", "0",
            "--store", store, "--tickets", str(spec.tickets), "--access-log", "plain",
            "--log-level", "info"]


def _clean_env() -> None:
    """Servers get their settings from flags only, so every one runs with the same defaults."""
    for name in [n for n in os.environ if n.startswith("TICKETBOOTH_")]:
        del os.environ[name]


def _others(result: Run) -> str:
    shown = f"{result.foreign_cpu or 0:.2f}"
    if result.foreign_load_cpu is not None:
        shown += f"/{result.foreign_load_cpu:.2f}"
    return shown


def _per_sale(result: Run) -> str:
    if result.db_us_per_sale is None:
        return ""
    return (f" ({result.service_us_per_sale:,.0f} us/sale, PostgreSQL "
            f"{result.db_us_per_sale:,.0f} us/sale)")


def _children_cpu_seconds(*, user_only: bool = False) -> float:
    """CPU used by the bench's children that have ended: its wrk and load runs."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + (0.0 if user_only else children.ru_stime)


def _reset(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Bench:
    """One bench run: servers up, warm-up, interleaved repetitions, report."""

    def __init__(self, args: argparse.Namespace, pinning: Pinning, stack: ExitStack) -> None:
        self.args = args
        self.pinning = pinning
        self.stack = stack
        self.out: Path = args.out
        self.logs = _reset(self.out / "logs")
        self.work = _reset(self.out / "work")
        stack.callback(shutil.rmtree, self.work, True)
        self.servers: dict[str, ServerProcess] = {}
        #: The delay proxies, by their delay in ms: one each, shared by the servers using it.
        self.proxies: dict[float, ServerProcess] = {}
        self.postgres_port = 0
        self.measurements = selected_measurements(args.only)
        self.measured = {m.name: Measured(m.name, m.title, m.tool, len(m.servers), note=m.note,
                                          noise_limit=args.noise_limit)
                         for m in self.measurements}
        self.postgres_version = ""
        self.postmaster = 0
        #: Each PostgreSQL store's database URL (``postgres:N`` -> URL), and the bench's own
        #: connection to it, kept open: a backend per count would come and go inside a
        #: run's CPU window, and the CPU of one gone is no longer in the tree counted.
        self.databases: dict[str, str] = {}
        self._counting: dict[str, Any] = {}
        self.noise_budget: int = args.noise_redos

    # --- servers ----------------------------------------------------------------------

    def _postgres(self, needed: set[str]) -> dict[str, str]:
        stores = sorted({SERVERS[n].store for n in needed if SERVERS[n].on_postgres})
        if not stores:
            return {}
        from tests.support.pg import PostgresServer, PostgresUnavailable

        _say("bench: starting PostgreSQL (durable) ...")
        try:
            server = PostgresServer(durable=True, cpus=self.pinning.server_cpus)
            self.stack.callback(server.remove)
            server.start()
            self.postgres_version = server.bindir.parent.name
            pid_file = (server.data / "postmaster.pid").read_text().split()
            self.postmaster = int(pid_file[0]) if pid_file else 0
            self.postgres_port = server.port
            return {store: server.new_database() for store in stores}
        except PostgresUnavailable as exc:
            raise BenchError(f"PostgreSQL cannot be had: {exc}") from exc

    def _start_proxies(self, needed: set[str]) -> dict[float, int]:
        """One delay proxy per delay in use, on the load's CPU (it stands for the network,
        not for the servers' machine); answers each one's port."""
        delays = sorted({d for n in needed if (d := SERVERS[n].delay_ms) is not None})
        for delay in delays:
            name = f"delayproxy-{delay:g}ms"
            _say(f"bench: starting {name} to PostgreSQL")
            command = self.pinning.load([
                sys.executable, "-m", "bench.delayproxy", "--delay-ms", f"{delay:g}",
                "--target", f"127.0.0.1:{self.postgres_port}"])
            proc = ServerProcess(name, command, self.logs)
            self.stack.callback(proc.stop)
            proc.start()
            self.proxies[delay] = proc
        return {delay: port_of(proc.wait_listening()) for delay, proc in self.proxies.items()}

    def start_servers(self) -> None:
        needed = {s for m in self.measurements for s in m.servers}
        databases = self.databases = self._postgres(needed)
        proxies = self._start_proxies(needed)
        names = [n for n in SERVERS if n in needed]
        _say(f"bench: starting {len(names)} servers: {', '.join(names)}")
        for name in names:
            command = self.pinning.server(_server_command(SERVERS[name], self.work, databases,
                                                          proxies))
            proc = ServerProcess(name, command, self.logs)
            self.stack.callback(proc.stop)
            proc.start()
            self.servers[name] = proc
        for name, proc in self.servers.items():
            proc.wait_listening()
            proc.probe("/" if SERVERS[name].kind != "service" else "/healthz")

    def _proxies_of(self, m: Measurement) -> list[ServerProcess]:
        return [self.proxies[d] for d in {SERVERS[n].delay_ms for n in m.servers}
                if d is not None]

    def urls(self, m: Measurement) -> list[str]:
        for proxy in self._proxies_of(m):
            proxy.check_alive()
        for name in m.servers:
            self.servers[name].check_alive()
        return [self.servers[name].url for name in m.servers]

    # --- load -------------------------------------------------------------------------

    def _server_side_user_seconds(self) -> float:
        """User CPU used so far by every server (idle ones too) and PostgreSQL."""
        total = sum(s.cpu_seconds(user_only=True) for s in self.servers.values())
        if self.postmaster:
            total += tree_cpu_seconds(self.postmaster, user_only=True)
        return total

    def _proxy_seconds(self, *, user_only: bool = False) -> float:
        """CPU used so far by every delay proxy (idle ones too): on the load's CPU."""
        return sum(p.cpu_seconds(user_only=user_only) for p in self.proxies.values())

    def _db_seconds(self) -> float:
        return tree_cpu_seconds(self.postmaster) if self.postmaster else 0.0

    def _commits(self, m: Measurement) -> tuple[int, int] | None:
        """For a row on PostgreSQL: the batches committed so far that sold, and their
        tickets (its ``sales`` table has a row per such batch)."""
        store = SERVERS[m.servers[0]].store
        if store not in self.databases:
            return None
        import psycopg

        try:
            conn = self._counting.get(store)
            if conn is None:
                conn = self._counting[store] = psycopg.connect(
                    self.databases[store], autocommit=True, connect_timeout=5)
                self.stack.callback(conn.close)
            row = conn.execute("SELECT count(*), coalesce(sum(count), 0) FROM sales"
                               ).fetchone()
        except psycopg.Error as exc:  # a figure missing, not a reason to stop the bench
            _say(f"bench: could not count {m.name}'s commits: {exc}")
            if (broken := self._counting.pop(store, None)) is not None:
                broken.close()
            return None
        assert row is not None
        return int(row[0]), int(row[1])

    def _load(self, m: Measurement, duration: int, rate: float | None = None, *,
              warm_up: bool = False) -> Run:
        return self._answered(m, duration, rate, warm_up)

    def _answered(self, m: Measurement, duration: int, rate: float | None,
                  warm_up: bool) -> Run:
        for attempt in range(MAX_RETRIES + 1):
            try:
                result = self._load_once(m, duration, rate, warm_up)
            except NoAnswer as exc:
                if attempt == MAX_RETRIES:
                    raise BenchError(f"{exc} ({MAX_RETRIES + 1} tries)") from None
                _say(f"bench: {exc}: the machine stalled? trying again")
                continue
            result.retries = attempt
            return result
        raise AssertionError("unreachable")

    def _load_once(self, m: Measurement, duration: int, rate: float | None,
                   warm_up: bool) -> Run:
        urls = self.urls(m)
        servers = [self.servers[name] for name in m.servers]
        cores = self.pinning.cores
        proxies = self._proxies_of(m)
        commits_before = self._commits(m)  # before the CPU counts start: not the row's work
        served_before = sum(s.cpu_seconds() for s in servers)
        proxy_before = sum(p.cpu_seconds() for p in proxies)
        db_before = self._db_seconds()
        load_before = _children_cpu_seconds() + self._proxy_seconds()
        side_before = self._server_side_user_seconds()
        load_user_before = _children_cpu_seconds(user_only=True) + self._proxy_seconds(
            user_only=True)
        user_before = ([user_cpu_seconds([c]) for c in cores] if cores
                       else [user_cpu_seconds(None)])
        started = time.monotonic()
        if m.tool == "wrk":
            result = run_wrk(urls, duration=duration, connections=self.args.connections,
                             pinning=self.pinning, script_dir=self.logs, keyed=m.keyed,
                             as_booths=m.as_booths,
                             nonce=uuid.uuid4().hex[:12], allow_empty=warm_up)
        else:
            result = run_ticketbooth_load(urls, duration=duration,
                                          booths=self.args.connections, pinning=self.pinning,
                                          rate=rate)
        wall = time.monotonic() - started
        user = [after - before for after, before in zip(
            [user_cpu_seconds([c]) for c in cores] if cores else [user_cpu_seconds(None)],
            user_before, strict=True)]
        served = sum(s.cpu_seconds() for s in servers) - served_before
        proxied = sum(p.cpu_seconds() for p in proxies) - proxy_before
        db = self._db_seconds() - db_before
        loaded = _children_cpu_seconds() + self._proxy_seconds() - load_before
        side = self._server_side_user_seconds() - side_before
        load_user = (_children_cpu_seconds(user_only=True) + self._proxy_seconds(user_only=True)
                     - load_user_before)
        commits_after = self._commits(m)
        if commits_before is not None and commits_after is not None:
            batches = commits_after[0] - commits_before[0]
            if batches:
                result.tickets_per_commit = round(
                    (commits_after[1] - commits_before[1]) / batches, 1)
        if not wall:
            return result
        result.server_cpu = round(served / result.seconds, 3) if result.seconds else None
        result.load_cpu = round(loaded / wall, 3)
        on_postgres = any(SERVERS[n].on_postgres for n in m.servers)
        if proxies:
            result.proxy_cpu = round(proxied / wall, 3)
        if on_postgres:
            result.db_cpu = round(db / wall, 3)
        if result.sales and all(SERVERS[n].kind == "service" for n in m.servers):
            result.service_us_per_sale = round(served / result.sales * 1e6, 1)
            if on_postgres:
                result.db_us_per_sale = round(db / result.sales * 1e6, 1)
        # Others' user CPU: the CPU's user time less the bench's own processes' there.
        if cores:  # servers and PostgreSQL on the first CPU, the load on the second
            result.foreign_cpu = round(max(0.0, (user[0] - side) / wall), 3)
            result.foreign_load_cpu = round(max(0.0, (user[1] - load_user) / wall), 3)
        else:
            result.foreign_cpu = round(max(0.0, (user[0] - side - load_user) / wall), 3)
        return result

    def warm_up(self) -> None:
        if not self.args.warmup:
            return
        warmed: set[tuple[str, ...]] = set()
        for m in self.measurements:  # with wrk, whichever tool measures
            if m.servers in warmed:
                continue
            warmed.add(m.servers)
            _say(f"bench: warm-up {', '.join(m.servers)} ({self.args.warmup} s)")
            self._load(replace(m, tool="wrk"), self.args.warmup, warm_up=True)

    def measure(self) -> None:
        """Every repetition of every closed loop, interleaved; then the open loops, whose
        rates come from the closed loops' medians. After each phase, noisy runs are
        replaced (see :meth:`_quiet_up`)."""
        peaks = [m for m in self.measurements if m.half_peak_of is None]
        opens = [m for m in self.measurements if m.half_peak_of is not None]
        for phase in (peaks, opens):
            repeat, duration = self._plan(phase[0]) if phase else (0, 0)
            for rep in range(repeat):
                shift = rep % len(phase)
                for m in phase[shift:] + phase[:shift]:  # another order each repetition
                    self._record(m, f"{rep + 1}/{repeat}",
                                 self._load(m, duration, self._rate(m)))
            self._quiet_up(phase)

    def _plan(self, m: Measurement) -> tuple[int, int]:
        """A measurement's repetitions and seconds per repetition."""
        if m.half_peak_of is None:
            return self.args.repeat, self.args.duration
        return self.args.open_repeat, self.args.open_duration

    def _rate(self, m: Measurement) -> float | None:
        return self.measured[m.half_peak_of].rps / 2 if m.half_peak_of else None

    def _quiet_up(self, phase: Sequence[Measurement]) -> None:
        """Others' bursts on this shared machine last a while: rather than redo a noisy run
        at once, run one more repetition of each noisy measurement after the phase, while
        the bench's budget of extra runs (--noise-redos) lasts, and keep the --repeat
        quietest runs. Which runs are kept depends on others' CPU only, never on the
        figures."""
        for _round in range(self.args.noise_redos):
            noisy = [m for m in phase if self.measured[m.name].noisy]
            if not noisy or self.noise_budget <= 0:
                return
            for m in noisy:
                if self.noise_budget <= 0:
                    return
                self.noise_budget -= 1
                _say(f"bench: {m.name} was noisy (others competed for "
                     f"{self.measured[m.name].noise:.2f} CPU): one more run")
                self._record(m, "extra", self._load(m, self._plan(m)[1], self._rate(m)))

    def _record(self, m: Measurement, rep: str, result: Run) -> None:
        self.measured[m.name].offer(result, self._plan(m)[0])
        extra = f" at {result.rate:,.0f} asked" if result.rate is not None else ""
        bad = f", {result.non_2xx} not 2xx" if result.non_2xx else ""
        _say(f"bench: [{rep}] {m.name:<17} {result.rps:9,.0f} req/s"
             f"{extra}  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  server CPU "
             f"{result.server_cpu or 0:.2f}{_per_sale(result)}  others' CPU "
             f"{_others(result)}{bad}")


def _machine(pinning: Pinning, out: Path, wrk: str) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "usable_cpus": sorted(os.sched_getaffinity(0)),
            "pinned": pinning.pinned, "pinning": pinning.note,
            "server_cpus": pinning.server_cpus, "load_cpus": pinning.load_cpus,
            "python": platform.python_version(), "platform": platform.platform(),
            "wrk": wrk, "work_filesystem": filesystem_of(out),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def _bench(args: argparse.Namespace) -> int:
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    wrk = wrk_version()
    _clean_env()
    args.out.mkdir(parents=True, exist_ok=True)
    pinning = detect_pinning(not args.no_pin)
    machine = _machine(pinning, args.out, wrk)
    _say(f"bench: {pinning.note}; load average {machine['loadavg_before']}")
    with ExitStack() as stack:
        bench = Bench(args, pinning, stack)
        bench.start_servers()
        bench.warm_up()
        bench.measure()
    machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    machine["postgres"] = bench.postgres_version or None
    measured = [bench.measured[m.name] for m in bench.measurements]
    checks = evaluate(CHECKS, bench.measured)
    text = format_text(measured, checks)
    print(text)
    noisy = [m.name for m in measured if m.noisy]
    print(f"\n{pinning.note}; load average before {machine['loadavg_before']}, after "
          f"{machine['loadavg_after']}")
    if noisy:
        print(f"NOISY: other processes took more than {args.noise_limit:g} CPU of the bench's "
              f"CPUs during runs of {', '.join(noisy)}, even after the extra runs: those "
              "figures and their ratios are not reliable; run again when the machine is "
              "quieter.")
    result = {
        "version": 1,
        "started_at": started_at,
        "elapsed_s": round(time.monotonic() - started, 1),
        "command": " ".join([PROG, *args.argv]),
        "config": {"repeat": args.repeat, "duration_s": args.duration,
                   "open_repeat": args.open_repeat, "open_duration_s": args.open_duration,
                   "warmup_s": args.warmup, "connections": args.connections,
                   "wrk_threads": WRK_THREADS, "smoke": args.smoke,
                   "noise_limit_cpus": args.noise_limit, "noise_redos": args.noise_redos,
                   "only": list(args.only) if args.only else None},
        "machine": machine,
        "method": list(METHOD_NOTES),
        "noisy_measurements": noisy,
        "measurements": [m.as_json() for m in measured],
        "checks": [c.as_json() for c in checks],
    }
    write_results(args.out, result, measured, checks)
    verdicts = [c.verdict for c in checks]
    print(f"\nbench: {verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS; wrote "
          f"{args.out / 'bench.json'}, bench.md, bench.png (in {result['elapsed_s']} s)")
    return EXIT_OK


def write_results(out: Path, result: dict[str, Any], measured: Sequence[Measured],
                  checks: Sequence[Check]) -> None:
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    noisy = result["noisy_measurements"]
    warning = (f"\n\nNOISY: others took more than {result['config']['noise_limit_cpus']:g} CPU "
               f"of the bench's CPUs during {', '.join(noisy)}: not reliable." if noisy else "")
    (out / "bench.md").write_text(
        f"Made by `{result['command']}` on {result['started_at']} "
        f"({result['machine']['pinning']}).{warning}\n\n"
        + format_markdown(measured, checks), encoding="utf-8")
    write_chart(out / "bench.png", measured, checks,
                f"ticketbooth bench {result['started_at']}: {result['machine']['pinning']}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(argv: Sequence[str] | None = None) -> int:
    """Run the bench described by ``argv``; answers the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_CANNOT_RUN
    args.argv = argv
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers are stopped too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _bench(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        print("bench: interrupted; every server was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    return run(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
