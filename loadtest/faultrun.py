"""What ``--faults``, ``--instances`` and ``--idempotent`` add to a run: their options, the
spawned fleet and the injector, checks 5 and 6, the history file and the report's faults
section.  ``loadtest.cli`` calls in here at a few points; the mechanisms live in
``loadtest.faults`` (injection) and ``loadtest.history`` (keyed, retried purchases).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from loadtest.argtypes import non_negative_int, positive_float, positive_int
from loadtest.checks import CheckResult
from loadtest.faults import (
    KINDS,
    Fault,
    FaultInjector,
    FaultPlan,
    Fleet,
    buyers_view,
    longest_without_sale,
    spawned_fleet,
    tickets_between,
    totals_by_kind,
)
from loadtest.history import Purchase, write_history
from loadtest.keyed_checks import check_acknowledged_durable, check_retries_sold_once
from loadtest.lookup import unsold_serials
from loadtest.stages import Schedule
from loadtest.stats import RunStats

__all__ = ["FaultRun", "FaultSection", "add_arguments", "check_arguments", "start"]

#: The spawned stock with --faults: enough that every interval between faults sells.
FAULT_TICKETS = 1_000_000


def fault_kinds(text: str) -> tuple[str, ...]:
    """``kill,term,pause`` -> the kinds, each once, in the order given."""
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(KINDS)}: {text!r}")
    return kinds


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of faults, instances and keyed retries."""
    g = p.add_argument_group("faults and retries")
    g.add_argument("--faults", type=fault_kinds, metavar="KINDS",
                   help="with --spawn and --duration (or --stages): harm the service during the "
                        "run, kinds "
                        "comma-separated: kill (SIGKILL, then start it again on the same port "
                        "and store), term (SIGTERM, wait for its exit, start again), pause "
                        "(SIGSTOP for --pause-for seconds, then SIGCONT); implies "
                        "--idempotent, and the spawned stock defaults to 1,000,000")
    g.add_argument("--fault-every", type=positive_float, default=2.0, metavar="SECONDS",
                   help="seconds between faults; the first comes after one interval, none in "
                        "the last (default 2)")
    g.add_argument("--pause-for", type=positive_float, default=1.0, metavar="SECONDS",
                   help="how long a pause fault keeps the service stopped (default 1)")
    g.add_argument("--seed", type=non_negative_int, metavar="N",
                   help="choose the kind and instance of each fault at random from seed N "
                        "(repeatable); default: in turn")
    g.add_argument("--instances", type=positive_int, default=1, metavar="N",
                   help="with --spawn: start N services on one postgresql:// store, booths "
                        "spread over them; faults hit one at a time (default 1)")
    g.add_argument("--idempotent", action="store_true",
                   help="every purchase carries an Idempotency-Key and is retried with it "
                        "until it has a definite answer; adds checks 5 and 6")
    g.add_argument("--retry-for", type=positive_float, default=30.0, metavar="SECONDS",
                   help="with --idempotent or --faults: how long one purchase is retried "
                        "before it counts as unknown (default 30)")
    g.add_argument("--history", metavar="PATH",
                   help="with --idempotent or --faults: write every purchase's history "
                        "(key, quantity, attempts, answer) to PATH as JSON lines")


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Cross-check the options; a usage error exits 2 with one line (through argparse)."""
    if args.faults:
        length = run_length(args)
        if not args.spawn or length is None:
            parser.error("--faults needs --spawn and --duration (or --stages): the load "
                         "generator must own the services it harms, and the run must have an "
                         "end")
        if not fault_schedule_fits(length, args.fault_every):
            parser.error(f"a run of {length:g} s leaves no room for a fault every "
                         f"{args.fault_every:g} s (the first comes after one interval, none in "
                         "the last): give a longer run or a shorter --fault-every")
    else:
        given = [flag for flag, default, value in (
            ("--fault-every", 2.0, args.fault_every), ("--pause-for", 1.0, args.pause_for),
            ("--seed", None, args.seed)) if value != default]
        if given:
            parser.error(f"{', '.join(given)} only apply with --faults")
    if args.instances > 1:
        if not args.spawn:
            parser.error("--instances only applies with --spawn (give --url once per "
                         "instance for services of your own)")
        if not (args.store or "").startswith(("postgresql://", "postgres://")):
            parser.error("--instances above 1 needs a postgresql:// --store: memory and "
                         "SQLite stores belong to one process")
    if not (args.faults or args.idempotent):
        given = [flag for flag, value in (("--retry-for", args.retry_for != 30.0),
                                          ("--history", args.history)) if value]
        if given:
            parser.error(f"{', '.join(given)} only apply with --idempotent or --faults")
    if args.history:
        folder = os.path.dirname(os.path.abspath(args.history))
        if args.history == "-" or not os.path.isdir(folder):
            parser.error(f"--history needs a file path in an existing directory: "
                         f"{args.history!r}")


def run_length(args: argparse.Namespace) -> float | None:
    """Seconds the run lasts: --duration, or the stages' total; None when it runs until
    sold out."""
    if args.stages:
        return Schedule(args.stages, args.start_rate or 0.0).duration
    return float(args.duration) if args.duration is not None else None


def fault_schedule_fits(duration: float, every: float) -> bool:
    """Whether one fault at least fits: after the first interval, before the last."""
    return every < duration - every - 1e-9


def keyed(args: argparse.Namespace) -> bool:
    """Whether the purchases carry keys and are retried."""
    return bool(args.faults or args.idempotent)


def spawn_tickets(args: argparse.Namespace) -> int:
    return args.tickets or (FAULT_TICKETS if args.faults else 100)


@dataclass
class FaultRun:
    """The fleet and injector of one run (either may be absent)."""

    fleet: Fleet | None = None
    injector: FaultInjector | None = None
    plan: FaultPlan | None = None

    def ticker(self, update: Callable[[int, int, int, float], None]
               ) -> Callable[[int, int, int, float], None]:
        """``update`` (the progress bar's), which also starts the injector at the first
        tick: the tick's elapsed time gives the run's start on the ``perf_counter`` clock."""
        injector = self.injector
        if injector is None:
            return update

        def tick(requests: int, tickets: int, errors: int, elapsed: float) -> None:
            injector.begin(time.perf_counter() - elapsed)
            update(requests, tickets, errors, elapsed)

        return tick

    def heal(self) -> str:
        """Stop injecting and wait until every instance answers; a reason when one does not
        (or could not be started again)."""
        if self.injector is not None:
            self.injector.finish()
            if self.injector.error:
                return self.injector.error
        if self.fleet is not None:
            down = self.fleet.wait_answering()
            if down:
                return f"not answering after the run: {', '.join(down)}"
        return ""


@contextlib.contextmanager
def _interrupt_heals(injector: FaultInjector | None) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) interrupts the run as Ctrl-C always does, and first ends the fault
    in progress: a paused service is continued at once, so the booths' requests in flight
    are answered instead of waiting out their timeout."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if injector is not None:
            injector.stop_soon()
        signal.default_int_handler(signum, frame)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start(args: argparse.Namespace, stack: ExitStack) -> FaultRun | None:
    """With --faults or --instances: spawn the fleet (and the injector) on ``stack``, so
    that they are stopped however the run ends; None for an ordinary run."""
    if not (args.spawn and (args.faults or args.instances > 1)):
        return None
    fleet = stack.enter_context(spawned_fleet(args.instances, spawn_tickets(args),
                                              args.store or "memory", args.server_arg))
    if not args.faults:
        stack.enter_context(_interrupt_heals(None))
        return FaultRun(fleet)
    plan = FaultPlan(args.faults, args.fault_every, args.pause_for, args.seed)
    # Entered after the fleet, so left before it: the injector stops before the services.
    length = run_length(args)
    assert length is not None, "check_arguments makes sure of it"
    injector = stack.enter_context(FaultInjector(fleet, plan, length))
    stack.enter_context(_interrupt_heals(injector))
    return FaultRun(fleet, injector, plan)


def purchases_of(stats: RunStats) -> list[Purchase]:
    return [p for b in stats.booths for p in b.purchases]


def keyed_checks(stats: RunStats, base_url: str, timeout: float) -> list[CheckResult]:
    """Checks 5 and 6; check 5 looks every acknowledged serial up at ``base_url``."""
    serials = stats.serials()
    missing, error = unsold_serials(base_url, sorted(set(serials)), timeout)
    return [check_acknowledged_durable(serials, missing, error),
            check_retries_sold_once(purchases_of(stats))]


def save_history(path: str, stats: RunStats) -> int:
    with open(path, "w", encoding="utf-8") as f:
        return write_history(purchases_of(stats), f)


@dataclass
class FaultSection:
    """The report's faults section: the faults, and what the buyers saw of them."""

    plan: FaultPlan | None
    instances: int
    retry_for: float
    faults: list[Fault] = field(default_factory=list)
    tickets_after: list[int] = field(default_factory=list)
    no_sale: list[float | None] = field(default_factory=list)
    buyers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, run: FaultRun | None, stats: RunStats, instances: int,
           retry_for: float) -> FaultSection:
        purchases = purchases_of(stats)
        faults = list(run.injector.faults) if run and run.injector else []
        return cls(run.plan if run else None, instances, retry_for, faults,
                   tickets_between(faults, purchases), longest_without_sale(faults, purchases),
                   buyers_view(purchases))

    def lines(self) -> list[str]:
        b = self.buyers
        out = []
        if self.plan is not None:
            kinds = ", ".join(f"{k} {n}" for k, n in totals_by_kind(self.faults).items())
            healed = [f.healed_after for f in self.faults if f.healed_after is not None]
            out += [f"faults      {len(self.faults)} injected ({kinds or 'none'}), one every "
                    f"{self.plan.every:g} s, pause {self.plan.pause_for:g} s"
                    + (f", seed {self.plan.seed}" if self.plan.seed is not None else "")
                    + (f"; answering again after {max(healed):.2f} s at most" if healed
                       else ""),
                    "  #       at  kind   instance  answering after  no sale for  "
                    "tickets until next"]
            rows = zip(self.faults, self.no_sale, self.tickets_after, strict=True)
            for i, (f, gap, n) in enumerate(rows, 1):
                back = "never" if f.healed_after is None else f"{f.healed_after:.2f} s"
                sold = "the rest" if gap is None else f"{gap:.2f} s"
                out.append(f"  {i:<3} {f.at:6.2f} s  {f.kind:<5}  {f.instance + 1:>8}  "
                           f"{back:>15}  {sold:>11}  {n:>18}")
        out += [f"purchases   {b['purchases']} keyed, {b['retried']} retried "
                f"({b['retries']} retries, retried for {self.retry_for:g} s at most); longest "
                f"wait for an answer {b['longest_wait_s']:.2f} s",
                f"            answers: sold {b['answer_sold']}, sold out "
                f"{b['answer_sold_out']}, rejected {b['answer_rejected']}, not sold "
                f"{b['answer_not_sold']}, unknown {b['answer_unknown']}"]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.as_dict() if self.plan else None,
            "instances": self.instances,
            "retry_for_s": self.retry_for,
            "injected": [dict(f.as_dict(), tickets_until_next=n,
                              longest_without_sale_s=None if gap is None else round(gap, 3))
                         for f, gap, n in zip(self.faults, self.no_sale, self.tickets_after,
                                              strict=True)],
            "totals": totals_by_kind(self.faults),
            "buyers": self.buyers,
        }

    def times(self) -> Sequence[tuple[float, str]]:
        """(time, kind) of each fault, for the plot."""
        return [(f.at, f.kind) for f in self.faults]
