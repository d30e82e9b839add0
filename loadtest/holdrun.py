"""``--scenario hold``: each purchase is a hold, then a confirm, a release, or nothing.

A booth sends ``POST /holds`` (``ttl_s`` from ``--hold-ttl``), waits ``--confirm-after``,
then releases the hold with probability ``--release``, leaves it to expire with probability
``--abandon``, and otherwise confirms it. What each hold became is recorded
(:class:`HoldRecord`), and the checks here compare it with the server's ``held`` count:
evidence the server did not derive.

- at the last read before the end (right after the booths stop), ``held`` lies between the
  tickets of the run's holds certainly still held and those possibly still held (a hold
  whose expiry falls within the read, or whose fate was lost with its answer);
- once every hold has ended (the run waits past the latest expiry before its final read),
  ``held`` is 0.

Both assume this run was the service's only client. Expiry times are the server's; the
generator compares them with its own clock, so the two must agree to within
:data:`CLOCK_TOLERANCE_S` (one machine, or hosts synchronised by NTP).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import datetime

from loadtest.argtypes import non_negative_float, positive_int
from loadtest.checks import CheckResult, Snapshot

__all__ = [
    "CLOCK_TOLERANCE_S",
    "HOLD_CHECK_NAMES",
    "HoldPlan",
    "HoldRecord",
    "add_arguments",
    "check_arguments",
    "check_held_at_end",
    "check_holds_ended",
    "latest_expiry",
    "parse_expiry",
    "plan_of",
]

#: How far the generator's clock and the server's may disagree.
CLOCK_TOLERANCE_S = 0.25

HOLD_CHECK_NAMES = ("holds-held-at-end", "holds-ended")

#: Fates of a hold: what its last answer said, or "unknown" when that answer was lost.
CONFIRMED, RELEASED, ABANDONED, EXPIRED, UNKNOWN = (
    "confirmed", "released", "abandoned", "expired", "unknown")


@dataclass(frozen=True)
class HoldPlan:
    """The hold scenario's settings (times in seconds, probabilities in 0..1)."""

    ttl_s: int = 2
    confirm_after: float = 0.0
    release: float = 0.0
    abandon: float = 0.0


@dataclass
class HoldRecord:
    """One hold the run made (or may have made): its quantity, when it expires by the
    server's clock (seconds since the epoch), and what became of it."""

    quantity: int
    expires_at: float
    fate: str
    serials: list[int] = field(default_factory=list)

    def possibly_held(self) -> bool:
        """Whether it may still count against the stock until it expires."""
        return self.fate in (ABANDONED, UNKNOWN)


def parse_expiry(text: str) -> float:
    """An RFC 3339 ``expires_at`` as seconds since the epoch."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def latest_expiry(holds: list[HoldRecord]) -> float:
    """When the last hold that may still be held runs out (0 when none may be)."""
    return max((h.expires_at for h in holds if h.possibly_held()), default=0.0)


def check_held_at_end(holds: list[HoldRecord], held: int | None, read_from: float,
                      read_until: float, error: str = "") -> CheckResult:
    """``held`` read between ``read_from`` and ``read_until`` (the generator's clock)
    against the run's holds: at least those surely held through the read, at most those
    that may have been."""
    name, title = HOLD_CHECK_NAMES[0], "held matches the run's live holds at the end"
    if held is None:
        return CheckResult(name, title, False, f"could not read /remaining: {error}")
    surely = sum(h.quantity for h in holds if h.fate == ABANDONED
                 and h.expires_at > read_until + CLOCK_TOLERANCE_S)
    maybe = sum(h.quantity for h in holds if h.possibly_held()
                and h.expires_at > read_from - CLOCK_TOLERANCE_S)
    bounds = f"held {held}, the run's holds still held: {surely}..{maybe}"
    if surely <= held <= maybe:
        return CheckResult(name, title, True, bounds)
    if held < surely:
        return CheckResult(name, title, False,
                           f"{bounds}: {surely - held} held tickets were given back early")
    return CheckResult(name, title, False,
                       f"{bounds}: {held - maybe} tickets held that no live hold of the run "
                       "holds")


def check_holds_ended(after: Snapshot | None, error: str = "") -> CheckResult:
    """Once every hold of the run has ended, nothing is held."""
    name, title = HOLD_CHECK_NAMES[1], "nothing held once every hold has ended"
    if after is None:
        return CheckResult(name, title, False, f"could not read /remaining after the run: "
                                               f"{error}")
    if after.held == 0:
        return CheckResult(name, title, True, "held 0 once every hold of the run had ended")
    return CheckResult(name, title, False,
                       f"held {after.held} after every hold of the run had ended")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scenario")
    group.add_argument("--scenario", choices=("buy", "hold"), default="buy",
                       help="buy: each purchase is a POST /buy (default); hold: a POST /holds, "
                            "then a confirm, a release or nothing (see --release, --abandon)")
    group.add_argument("--hold-ttl", type=positive_int, default=2, metavar="SECONDS",
                       help="--scenario hold: the ttl_s of each hold, so abandoned holds end "
                            "soon (default 2)")
    group.add_argument("--confirm-after", type=non_negative_float, default=0.0, metavar="MS",
                       help="--scenario hold: wait this long after a hold before confirming "
                            "or releasing it (default 0)")
    group.add_argument("--release", type=_probability, default=0.0, metavar="P",
                       help="--scenario hold: probability that a hold is released instead of "
                            "confirmed (default 0)")
    group.add_argument("--abandon", type=_probability, default=0.0, metavar="P",
                       help="--scenario hold: probability that a hold is left to expire "
                            "(default 0); the run waits for them before its final read")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a probability: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability lies in 0..1, got {text}")
    return value


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.scenario == "hold":
        if args.release + args.abandon > 1.0:
            parser.error(f"--release {args.release:g} and --abandon {args.abandon:g} add up "
                         "to more than 1")
        given = [flag for flag, value in (("--idempotent", args.idempotent),
                                          ("--faults", args.faults),
                                          ("--processes", args.processes > 1)) if value]
        if given:
            parser.error(f"--scenario hold does not take {', '.join(given)} (yet)")
    else:
        given = [flag for flag, default, value in (
            ("--hold-ttl", 2, args.hold_ttl), ("--confirm-after", 0.0, args.confirm_after),
            ("--release", 0.0, args.release), ("--abandon", 0.0, args.abandon))
            if value != default]
        if given:
            parser.error(f"{', '.join(given)} only apply with --scenario hold")


def plan_of(args: argparse.Namespace) -> HoldPlan | None:
    if args.scenario != "hold":
        return None
    return HoldPlan(ttl_s=args.hold_ttl, confirm_after=args.confirm_after / 1000.0,
                    release=args.release, abandon=args.abandon)
