"""``make demo`` (``python -m loadtest.demo``): the threading lesson, shown over HTTP.

Runs the default scenario -- 10 booths buying one ticket at a time from 100
until sold out -- twice, each against a freshly spawned service:

1. with the real ``memory`` store: every check must pass (exit 0);
2. with the lesson's ``unsafe-memory`` store, which reads the counter, yields
   and writes it back without a lock: the checks must catch the duplicated
   and oversold tickets (exit 1).

The demo succeeds (exit 0) only when both outcomes are the expected ones.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from loadtest.cli import EXIT_CHECK_FAILED, EXIT_OK, run

__all__ = ["SCENARIOS", "demo", "main"]

#: (title, arguments, expected exit status)
SCENARIOS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("the real store (memory): every check should pass",
     ("--spawn", "--store", "memory"), EXIT_OK),
    ("the lesson's unsafe store (unsafe-memory): the checks should catch it",
     ("--spawn", "--store", "unsafe-memory"), EXIT_CHECK_FAILED),
)


def demo(extra: Sequence[str] = ()) -> int:
    """Run both scenarios (with ``extra`` arguments added to each); 0 when both went as expected."""
    outcomes = []
    for i, (title, args, expected) in enumerate(SCENARIOS, 1):
        print(f"\n=== demo {i}/{len(SCENARIOS)}: {title} ===\n", flush=True)
        status = run([*args, *extra])
        outcomes.append((title, status, expected))
        sys.stdout.flush()
    print("\n=== demo summary ===")
    for title, status, expected in outcomes:
        mark = "as expected" if status == expected else "NOT AS EXPECTED"
        print(f"  exit {status} (expected {expected}) {mark}: {title}")
    good = all(status == expected for _, status, expected in outcomes)
    print("demo: OK, the checks tell the safe store from the unsafe one" if good
          else "demo: FAILED, see above")
    return 0 if good else 1


def main() -> int:
    return demo(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
