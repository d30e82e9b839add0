"""``ticketbooth-load``: the command line of the load generator.

``run(argv) -> int`` does the work and answers the exit status; ``main()``
is the console script.  Exit statuses: 0 every check passed, 1 a check
failed, 2 usage error or a service that cannot be reached at the start (or
cannot be spawned), 3 a threshold was breached, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import IO

import requests

from loadtest import faultrun, holdrun
from loadtest.argtypes import non_negative_float, positive_float, positive_int
from loadtest.booths import LoadPlan, classify_exception, run_load
from loadtest.checks import (
    CheckResult,
    RunRecord,
    Snapshot,
    check_thresholds,
    run_checks,
)
from loadtest.compare import run_compare
from loadtest.csvout import CsvStream, NewEntries
from loadtest.html_report import write_html
from loadtest.processes import run_load_processes
from loadtest.report import (
    PER_CLIENT_HINT,
    Progress,
    Report,
    format_text,
    hints,
    to_json,
    verdict,
    write_plot,
)
from loadtest.spawn import SpawnError, spawned_service
from loadtest.stages import Schedule, Stage, parse_stages
from loadtest.stats import BoothStats, RunStats, latency_summary, merge

__all__ = ["EXIT_CHECK_FAILED", "EXIT_OK", "EXIT_THRESHOLD", "EXIT_USAGE", "main", "run"]

PROG = "ticketbooth-load"
DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_THRESHOLD = 3
EXIT_INTERRUPTED = 130

#: Options that need an optional extra: option -> (the module it imports, the extra).
NEEDS_EXTRA = {"plot": ("matplotlib", "plot")}

#: Seconds allowed for each request that reads the service's state before and after the run.
PROBE_TIMEOUT = 5.0


class ServiceError(Exception):
    """The service could not be reached or gave an unexpected answer."""






def _fraction(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1: {text!r}")
    return value


def _stages(text: str) -> tuple[Stage, ...]:
    try:
        return parse_stages(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"not an http:// or https:// URL: {text!r}")
    return text.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Concurrent booths buy tickets from a ticketbooth service over HTTP, "
                    "measure latency and throughput, then check that nothing was oversold, "
                    "duplicated or lost.",
        epilog="Exit status: 0 all checks passed, 1 a check failed, 2 usage error or service "
               "unreachable at the start, 3 a threshold was breached. "
               f"'{PROG} compare BASE.json NEW.json' compares two runs' JSON results "
               f"(see '{PROG} compare --help').",
    )
    target = p.add_argument_group("target")
    target.add_argument("--url", action="append", type=_url, metavar="URL",
                        help=f"base URL of the service (default {DEFAULT_URL}); give it several "
                             "times to spread the booths round-robin over instances that share "
                             "one stock")
    target.add_argument("--spawn", action="store_true",
                        help="start a local service on a free loopback port for the run and stop "
                             "it afterwards (runs 'python -m app serve')")
    target.add_argument("--tickets", type=positive_int, metavar="N",
                        help="with --spawn: the spawned service's stock (default 100)")
    target.add_argument("--store", metavar="STORE",
                        help="with --spawn: the spawned service's store, e.g. memory, "
                             "sqlite:///PATH or unsafe-memory (default memory; --allow-unsafe is "
                             "passed for unsafe-memory)")
    target.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="with --spawn: one more argument for the spawned service, e.g. "
                             "--server-arg=--chore-ms=20 (may be repeated)")

    load = p.add_argument_group("load")
    load.add_argument("--booths", type=positive_int, metavar="N",
                      help="number of booths: concurrent buyer threads, each with its own "
                           "connection (default 10; 100 with --stages)")
    load.add_argument("--quantity", type=positive_int, default=1, metavar="K",
                      help="tickets asked for in each purchase (default 1)")
    load.add_argument("--requests", type=positive_int, metavar="N",
                      help="stop after N requests in total; booths then go on past sold out, "
                           "counting 409 answers (default: each booth stops at its first sold-out "
                           "answer)")
    load.add_argument("--duration", type=positive_float, metavar="SECONDS",
                      help="stop after this many seconds, going on past sold out like "
                           "--requests; with --requests, whichever comes first (default: until "
                           "sold out)")
    load.add_argument("--rate", type=positive_float, metavar="R",
                      help="open loop: send R requests per second in total at a constant rate, "
                           "measuring latency from each request's intended send time "
                           "(coordinated-omission correction); default: closed loop, each "
                           "booth sends as soon as it has its answer")
    load.add_argument("--stages", type=_stages, metavar="DURATION:RATE,...",
                      help="open loop whose arrival rate ramps linearly, stage by stage, from "
                           "the previous stage's rate to each stage's RATE (requests/s) over its "
                           "DURATION (s, m or h), e.g. 10s:100,30s:2000,20s:2000,10s:0; the run "
                           "lasts the stages' total, going on past sold out; latency is measured "
                           "from intended send times as with --rate")
    load.add_argument("--start-rate", type=non_negative_float, metavar="R",
                      help="with --stages: the rate the first stage ramps from (default 0)")
    load.add_argument("--think", type=non_negative_float, default=0.0, metavar="MS",
                      help="pause in milliseconds between one booth's purchases (closed loop "
                           "only; default 0)")
    load.add_argument("--processes", type=positive_int, default=1, metavar="P",
                      help="spread the booths over P worker processes when one Python process "
                           "cannot keep up (default 1: all booths are threads of this process)")
    load.add_argument("--timeout", type=positive_float, default=10.0, metavar="SECONDS",
                      help="timeout of each request (default 10)")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", dest="json_path",
                     help="write the full result as JSON to PATH, or to stdout with '-' (the "
                          "human report then goes to stderr)")
    out.add_argument("--plot", metavar="PATH.png",
                     help="write a PNG of throughput and latency percentiles over time")
    out.add_argument("--html", metavar="PATH.html",
                     help="write a self-contained HTML report (charts, tables, checks), "
                          "readable offline")
    out.add_argument("--csv", metavar="PATH.csv",
                     help="write the time series (the JSON timeseries' columns) as CSV, one row "
                          "per second as the run goes, flushed each second")
    out.add_argument("--quiet", "-q", action="store_true",
                     help="print only the verdict line (and FAIL lines); no table, no progress "
                          "bar")

    limits = p.add_argument_group("thresholds (exit 3 when breached)")
    limits.add_argument("--max-p99-ms", type=positive_float, metavar="MS",
                        help="fail when the 99th percentile latency is above MS milliseconds")
    limits.add_argument("--max-error-rate", type=_fraction, metavar="FRACTION",
                        help="fail when errors / requests is above FRACTION (0..1), e.g. 0.01")
    faultrun.add_arguments(p)
    holdrun.add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and cross-check the options; usage errors exit 2 through argparse."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spawn and args.url:
        parser.error("--spawn starts its own service: do not give --url with it")
    if not args.spawn:
        given = [flag for flag, value in (("--tickets", args.tickets), ("--store", args.store),
                                          ("--server-arg", args.server_arg)) if value]
        if given:
            parser.error(f"{', '.join(given)} only apply with --spawn")
    if args.rate and args.think:
        parser.error("--think applies to the closed loop only: do not give it with --rate")
    if args.stages:
        given = [flag for flag, value in (("--rate", args.rate), ("--duration", args.duration),
                                          ("--requests", args.requests), ("--think", args.think))
                 if value]
        if given:
            parser.error(f"--stages sets the rate and the length of the run: do not give "
                         f"{', '.join(given)} with it")
        if Schedule(args.stages, args.start_rate or 0.0).total == 0:
            parser.error("--stages schedules no request at all: give a stage a rate above 0")
    elif args.start_rate is not None:
        parser.error("--start-rate only applies with --stages")
    if args.booths is None:
        args.booths = 100 if args.stages else 10
    for path in (args.json_path, args.plot, args.html, args.csv):
        if path and path != "-":
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                parser.error(f"no such directory for {path!r}: {folder}")
    for flag, path in (("--plot", args.plot), ("--html", args.html), ("--csv", args.csv)):
        if path == "-":
            parser.error(f"{flag} needs a file path")
    faultrun.check_arguments(args, parser)
    holdrun.check_arguments(args, parser)
    return args


def missing_extra(args: argparse.Namespace,
                  installed: Callable[[str], bool] | None = None) -> str | None:
    """One line naming the extra to install when an option given needs one that is missing."""
    installed = installed or (lambda module: importlib.util.find_spec(module) is not None)
    for option, (module, extra) in NEEDS_EXTRA.items():
        if getattr(args, option) and not installed(module):
            return (f"--{option} needs {module}, which is not installed: "
                    f"pip install 'ticketbooth[{extra}]'")
    return None


def _get_json(url: str) -> dict[str, object]:
    try:
        response = requests.get(url, timeout=PROBE_TIMEOUT)
    except requests.RequestException as exc:
        kind, _ = classify_exception(exc)
        reason = {"refused": "connection refused (is the service running?)",
                  "timeout": f"no answer within {PROBE_TIMEOUT:g} s",
                  "reset": "the connection was reset"}.get(kind, str(exc))
        raise ServiceError(f"cannot reach the service at {url}: {reason}") from None
    if response.status_code == 429:
        raise ServiceError(f"GET {url} was refused, HTTP 429: {PER_CLIENT_HINT}")
    if response.status_code != 200:
        raise ServiceError(f"unexpected answer from GET {url}: HTTP {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        raise ServiceError(f"unexpected answer from GET {url}: not JSON") from None
    if not isinstance(body, dict):
        raise ServiceError(f"unexpected answer from GET {url}: not a JSON object")
    return body


def read_remaining(base_url: str) -> Snapshot:
    """``GET /remaining`` as a Snapshot; ServiceError when it cannot be had."""
    url = base_url + "/remaining"
    body = _get_json(url)
    try:
        values = {k: body[k] for k in ("remaining", "sold", "total")}
    except KeyError as exc:
        raise ServiceError(f"unexpected answer from GET {url}: no {exc.args[0]!r}") from None
    values["held"] = body.get("held", 0)  # a service without holds does not say
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
        raise ServiceError(f"unexpected answer from GET {url}: counts are not integers")
    return Snapshot(**values)  # type: ignore[arg-type]


def _plan(args: argparse.Namespace, urls: Sequence[str]) -> LoadPlan:
    schedule = Schedule(args.stages, args.start_rate or 0.0) if args.stages else None
    return LoadPlan(urls=tuple(urls), booths=args.booths, quantity=args.quantity,
                    requests=args.requests,
                    duration=schedule.duration if schedule else args.duration, rate=args.rate,
                    think_s=args.think / 1000.0, timeout=args.timeout,
                    processes=args.processes, schedule=schedule,
                    idempotent=faultrun.keyed(args), retry_for=args.retry_for,
                    holds=holdrun.plan_of(args))


def _execute(args: argparse.Namespace, urls: Sequence[str], spawn: dict[str, object] | None,
             out: IO[str], chaos: faultrun.FaultRun | None = None) -> int:
    before = read_remaining(urls[0])
    for url in dict.fromkeys(urls[1:]):
        _get_json(url + "/healthz")
    plan = _plan(args, urls)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    # The bar only on a terminal: never in pipes or CI logs (with --json - stdout is the JSON).
    show_bar = sys.stdout.isatty() and out.isatty() and not args.quiet
    progress = Progress(plan, before.remaining, enabled=show_bar, stream=out)
    update = chaos.ticker(progress.update) if chaos else progress.update
    try:
        stream = CsvStream(args.csv) if args.csv else None
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.csv}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if plan.processes > 1:
            def tick_processes(requests: int, tickets: int, errors: int, elapsed: float) -> None:
                update(requests, tickets, errors, elapsed)
                if stream is not None:
                    stream.tick(elapsed)

            result = run_load_processes(plan, on_tick=tick_processes,
                                        on_entries=stream.add if stream else None)
        else:
            new_entries = NewEntries()

            def tick(booths: Sequence[BoothStats], elapsed: float) -> None:
                update(sum(b.requests for b in booths), sum(b.tickets for b in booths),
                       sum(b.error_count for b in booths), elapsed)
                if stream is not None:
                    stream.add(new_entries(booths))
                    stream.tick(elapsed)

            result = run_load(plan, on_tick=tick)
            if stream is not None:
                stream.add(new_entries(result.booths))
    finally:
        progress.close()
        if stream is not None:
            stream.close()
    fault_error = chaos.heal() if chaos else ""
    stats = merge(result.booths)
    held_at_end = _held_at_end(urls[0], stats, out, args.quiet) if plan.holds else None
    after: Snapshot | None = None
    after_error = ""
    try:
        after = read_remaining(urls[0])
    except ServiceError as exc:
        after_error = str(exc)
    checks = run_checks(RunRecord(serials=stats.serials(), before=before, after=after,
                                  acknowledged=stats.tickets, unknown=stats.unknown_tickets,
                                  after_error=after_error))
    if held_at_end is not None:
        checks += [held_at_end, holdrun.check_holds_ended(after, after_error)]
    faults = None
    if plan.idempotent:
        checks += faultrun.keyed_checks(stats, urls[0], PROBE_TIMEOUT)
        faults = faultrun.FaultSection.of(chaos, stats, len(dict.fromkeys(urls)), plan.retry_for)
    thresholds = check_thresholds(latency_summary(stats.histogram)["p99"], stats.error_rate,
                                  args.max_p99_ms, args.max_error_rate)
    report = Report(plan=plan, stats=stats, elapsed=result.elapsed, started_at=started_at,
                    before=before, after=after, checks=checks, thresholds=thresholds,
                    interrupted=result.interrupted, spawn=spawn, faults=faults)
    if result.interrupted:
        report.exit_status = EXIT_INTERRUPTED
    elif report.failed_checks:
        report.exit_status = EXIT_CHECK_FAILED
    elif report.breached:
        report.exit_status = EXIT_THRESHOLD

    if args.quiet:
        fails = [f"  FAIL  {c.name}: {c.detail}" for c in checks if not c.passed]
        print("\n".join([*fails, *hints(stats.status_counts), verdict(report)]), file=out)
    else:
        print(format_text(report), file=out)
    if fault_error:
        print(f"{PROG}: error: {fault_error}", file=sys.stderr)
        report.exit_status = EXIT_USAGE
    try:
        if args.history:
            faultrun.save_history(args.history, stats)
        if args.plot:
            write_plot(report, args.plot)
        if args.html:
            write_html(to_json(report), args.html)
        if args.json_path == "-":
            json.dump(to_json(report), sys.stdout, indent=2)
            sys.stdout.write("\n")
            sys.stdout.flush()
        elif args.json_path:
            with open(args.json_path, "w", encoding="utf-8") as f:
                json.dump(to_json(report), f, indent=2)
                f.write("\n")
    except OSError as exc:
        print(f"{PROG}: error: cannot write the result: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return report.exit_status


def _held_at_end(url: str, stats: RunStats, out: IO[str], quiet: bool) -> CheckResult:
    """--scenario hold: read ``held`` once the booths have stopped and compare it with the
    run's holds; then wait until every hold of the run has ended (before the final read)."""
    holds = [hold for booth in stats.booths for hold in booth.holds]
    read_from = time.time()
    try:
        held: int | None = read_remaining(url).held
        error = ""
    except ServiceError as exc:
        held, error = None, str(exc)
    check = holdrun.check_held_at_end(holds, held, read_from, time.time(), error)
    wait = holdrun.latest_expiry(holds) + holdrun.CLOCK_TOLERANCE_S - time.time()
    if wait > 0:
        if not quiet:
            print(f"waiting {wait:.1f} s for the run's last holds to expire", file=out)
        time.sleep(wait)  # the run's own holds end then, by the server's clock
    return check


def run(argv: Sequence[str] | None = None) -> int:
    """Run the load test described by ``argv`` and answer the exit status."""
    if argv and argv[0] == "compare":
        return run_compare(argv[1:])
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    missing = missing_extra(args)
    if missing:  # said before the run, not after it
        print(f"{PROG}: error: {missing}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stderr if args.json_path == "-" else sys.stdout
    try:
        with ExitStack() as stack:
            chaos = faultrun.start(args, stack)
            if args.spawn:
                tickets = faultrun.spawn_tickets(args)
                store = args.store or "memory"
                spawn: dict[str, object] | None = {
                    "tickets": tickets, "store": store, "server_args": list(args.server_arg)}
                if chaos and chaos.fleet:
                    urls = chaos.fleet.urls
                    spawn = {**(spawn or {}), "instances": len(urls)}
                else:
                    urls = [stack.enter_context(spawned_service(tickets, store,
                                                                args.server_arg))]
            else:
                spawn = None
                urls = args.url or [DEFAULT_URL]
            return _execute(args, urls, spawn, out, chaos)
    except (ServiceError, SpawnError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main() -> int:
    """Console script entry point."""
    try:
        return run(sys.argv[1:])
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
