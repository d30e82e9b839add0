"""Checks 5 and 6, for runs whose purchases carry keys (``--idempotent``, ``--faults``).

Pure functions over what the run recorded, like the four checks in ``loadtest.checks``:

5. ``acknowledged-durable``: every serial the booths were told is theirs is still on
   record after the run (the serials ``GET /tickets/<serial>`` did not find are given);
6. ``retries-sold-once``: every key's answers agree (a replay hands out exactly the serials
   of the first answer) and no serial was handed out under two keys.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from loadtest.checks import CheckResult
from loadtest.history import Purchase

__all__ = ["KEYED_CHECK_NAMES", "check_acknowledged_durable", "check_retries_sold_once"]

KEYED_CHECK_NAMES = ("acknowledged-durable", "retries-sold-once")

#: How many offenders a detail line quotes at most.
_QUOTE = 5


def _quote(values: Iterable[object]) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:_QUOTE])
    return text + (", ..." if len(values) > _QUOTE else "")


def check_acknowledged_durable(acknowledged: Iterable[int], missing: Iterable[int],
                               lookup_error: str = "") -> CheckResult:
    """Check 5: no acknowledged serial is missing after the run."""
    title = "every acknowledged ticket is still sold after the run"
    handed = set(acknowledged)
    if lookup_error:
        return CheckResult(KEYED_CHECK_NAMES[0], title, False,
                           f"could not look the tickets up: {lookup_error}")
    lost = sorted(set(missing) & handed)
    if lost:
        return CheckResult(KEYED_CHECK_NAMES[0], title, False,
                           f"{len(lost)} of {len(handed)} acknowledged serials are not sold "
                           f"(GET /tickets/<serial> answers 404), e.g. {_quote(lost)}")
    return CheckResult(KEYED_CHECK_NAMES[0], title, True,
                       f"all {len(handed)} acknowledged serials answer 200 at /tickets/<serial>")


def check_retries_sold_once(purchases: Iterable[Purchase]) -> CheckResult:
    """Check 6: the answers a key got agree, and no serial went out under two keys."""
    title = "a retried purchase is sold once"
    keys: dict[int, set[str]] = defaultdict(set)
    disagree: list[str] = []
    count = attempts = 0
    for p in purchases:
        count += 1
        attempts += len(p.attempts)
        answers = {a.serials if a.outcome == "200" else a.outcome for a in p.attempts
                   if a.outcome in ("200", "409 sold_out")}
        if len(answers) > 1:
            disagree.append(p.key)
        for a in p.attempts:
            for serial in a.serials:
                keys[serial].add(p.key)
    shared = sorted(s for s, ks in keys.items() if len(ks) > 1)
    problems = []
    if disagree:
        problems.append(f"{len(disagree)} keys got answers that disagree, e.g. "
                        f"{_quote(disagree)}")
    if shared:
        problems.append(f"{len(shared)} serials were handed out under more than one key, "
                        f"e.g. {_quote(shared)}")
    if problems:
        return CheckResult(KEYED_CHECK_NAMES[1], title, False, "; ".join(problems))
    return CheckResult(KEYED_CHECK_NAMES[1], title, True,
                       f"{count} keys, {attempts} attempts: every key's answers agree, "
                       "no serial under two keys")
