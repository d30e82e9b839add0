"""``make demo`` (``python -m loadtest.demo``): the threading lesson, shown over HTTP.

Runs the default scenario -- 10 booths buying one ticket at a time from 100
until sold out -- twice, each against a freshly spawned service:

1. with the real ``memory`` store: every check must pass (exit 0);
2. with the lesson's ``unsafe-memory`` store, which reads the counter, yields
   and writes it back without a lock: the checks must catch the duplicated
   and oversold tickets (exit 1).

Then the lesson of durability, with ``--faults``:

3. a SQLite store (in a fresh temporary folder), killed, stopped and paused
   during the run: every check must pass (exit 0);
4. the memory store, killed during the run: it comes back with a fresh stock
   and hands the same serials out again, and the checks must catch it (exit 1).

The demo succeeds (exit 0) only when all four outcomes are the expected ones.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from loadtest.cli import EXIT_CHECK_FAILED, EXIT_OK, run

__all__ = ["FAULT_RUN", "SCENARIOS", "demo", "fault_scenarios", "main"]

#: (title, arguments, expected exit status)
SCENARIOS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("the real store (memory): every check should pass",
     ("--spawn", "--store", "memory"), EXIT_OK),
    ("the lesson's unsafe store (unsafe-memory): the checks should catch it",
     ("--spawn", "--store", "unsafe-memory"), EXIT_CHECK_FAILED),
)


#: How the fault scenarios run: a fault every 2 s (the default) for 10 s.
FAULT_RUN: tuple[str, ...] = ("--duration", "10")


def fault_scenarios(folder: Path, fault_run: Sequence[str] = FAULT_RUN
                    ) -> tuple[tuple[str, tuple[str, ...], int], ...]:
    """Scenarios 3 and 4; the SQLite file goes in ``folder``."""
    return (
        ("a durable store (SQLite) killed, stopped and paused: every check should pass",
         ("--spawn", "--store", f"sqlite:///{folder / 'demo.db'}", "--faults",
          "kill,term,pause", *fault_run), EXIT_OK),
        ("a forgetful store (memory) killed: the checks should catch what it forgot",
         ("--spawn", "--store", "memory", "--faults", "kill", *fault_run), EXIT_CHECK_FAILED),
    )


def demo(extra: Sequence[str] = (), fault_run: Sequence[str] = FAULT_RUN) -> int:
    """Run the four scenarios (with ``extra`` arguments added to each; ``fault_run`` to the
    last two); 0 when all went as expected."""
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="ticketbooth-demo-") as folder:
        scenarios = SCENARIOS + fault_scenarios(Path(folder), fault_run)
        for i, (title, args, expected) in enumerate(scenarios, 1):
            print(f"\n=== demo {i}/{len(scenarios)}: {title} ===\n", flush=True)
            status = run([*args, *extra])
            outcomes.append((title, status, expected))
            sys.stdout.flush()
    print("\n=== demo summary ===")
    for title, status, expected in outcomes:
        mark = "as expected" if status == expected else "NOT AS EXPECTED"
        print(f"  exit {status} (expected {expected}) {mark}: {title}")
    good = all(status == expected for _, status, expected in outcomes)
    print("demo: OK, the checks tell the safe store from the unsafe one, and the durable store "
          "from the forgetful one" if good else "demo: FAILED, see above")
    return 0 if good else 1


def main() -> int:
    return demo(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
