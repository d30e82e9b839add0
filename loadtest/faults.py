"""``--faults``: harm the spawned services mid-run, on a schedule, and bring them back.

Three kinds: ``kill`` (SIGKILL, then start the service again on the same port and store),
``term`` (SIGTERM, wait for its exit, start again) and ``pause`` (SIGSTOP for
``--pause-for`` seconds, then SIGCONT).  The services listen on ports chosen outside the
kernel's ephemeral range, so that no outgoing connection (a booth's, while its service
is down) can take a port its service needs again.  A fault comes every ``--fault-every``
seconds, the first after one interval, none in the last interval, so that the run ends
healed; they hit the instances in turn (or at random with ``--seed``) and never two at
once: the next fault waits until the instance answers again and half an interval more, so
that the booths sell between any two faults.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import requests

from loadtest.history import Purchase
from loadtest.spawn import STOP_TIMEOUT, ServiceProcess, SpawnError, serve_command

__all__ = [
    "KINDS",
    "Fault",
    "FaultInjector",
    "FaultPlan",
    "Fleet",
    "Instance",
    "buyers_view",
    "ephemeral_range",
    "fault_schedule",
    "longest_without_sale",
    "pick_ports",
    "spawned_fleet",
    "tickets_between",
]

KINDS = ("kill", "term", "pause")

#: Seconds a (re)start keeps trying while its port is still taken before the run fails.
RESTART_RETRY_S = 5.0
#: Seconds between those tries.
_RESTART_PAUSE_S = 0.2
#: Seconds an instance may take to answer ``/healthz`` again after a fault.
HEAL_TIMEOUT = 30.0
_EPHEMERAL_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
#: Linux's default ephemeral range, used where the kernel does not say.
_EPHEMERAL_DEFAULT = (32768, 60999)
#: Lowest port chosen: above the well-known (privileged) ones.
_LOWEST_PORT = 1024


@dataclass(frozen=True)
class FaultPlan:
    """What ``--faults`` asked for."""

    kinds: tuple[str, ...]
    every: float = 2.0
    pause_for: float = 1.0
    seed: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {"kinds": list(self.kinds), "every_s": self.every,
                "pause_for_s": self.pause_for, "seed": self.seed}


@dataclass(frozen=True)
class Planned:
    at: float
    kind: str
    instance: int


@dataclass
class Fault:
    """One fault injected: ``at`` seconds since the start; ``healed_after`` seconds until
    the instance answered again (None when it never did)."""

    kind: str
    instance: int
    at: float
    healed_after: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "instance": self.instance + 1, "at_s": round(self.at, 3),
                "healed_after_s": (None if self.healed_after is None
                                   else round(self.healed_after, 3))}


def fault_schedule(plan: FaultPlan, duration: float, instances: int) -> list[Planned]:
    """When each fault is due, of which kind, on which instance (0-based).

    One every ``plan.every`` seconds from the first interval's end, none in the last
    interval; kinds and instances in turn, or drawn from ``random.Random(seed)``.
    """
    last_allowed = duration - plan.every  # the last interval stays free
    count = 0
    while (count + 1) * plan.every < last_allowed - 1e-9:
        count += 1
    rng = random.Random(plan.seed) if plan.seed is not None else None
    out = []
    for i in range(count):
        if rng is None:
            kind, instance = plan.kinds[i % len(plan.kinds)], i % instances
        else:
            kind, instance = rng.choice(plan.kinds), rng.randrange(instances)
        out.append(Planned(round((i + 1) * plan.every, 9), kind, instance))
    return out


def ephemeral_range(path: str = _EPHEMERAL_FILE) -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux's default elsewhere)."""
    try:
        with open(path, encoding="ascii") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return low, high


def pick_ports(count: int, rng: random.Random | None = None,
               ephemeral: tuple[int, int] | None = None) -> list[int]:
    """``count`` distinct loopback ports outside the ephemeral range, free right now."""
    import socket

    rng = rng or random.Random()
    low, high = ephemeral or ephemeral_range()
    candidates = [*range(_LOWEST_PORT, low), *range(high + 1, 65536)]
    ports: list[int] = []
    for port in rng.sample(candidates, min(len(candidates), 200)):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the service does
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise SpawnError(f"no free loopback port outside the ephemeral range {low}-{high}")


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether ``GET /healthz`` answers 200 now."""
    try:
        return requests.get(url + "/healthz", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _wait_answering(url: str, timeout: float) -> bool:
    """Poll ``/healthz`` until it answers 200 (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not answers(url):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Instance:
    """One spawned service on a fixed port, which a fault may stop and start again."""

    def __init__(self, index: int, port: int, tickets: int, store: str,
                 extra: Sequence[str]) -> None:
        self.index = index
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = ServiceProcess(serve_command(tickets, store, extra, port=port))

    def start(self, retry_for: float = RESTART_RETRY_S) -> None:
        """Start (again); while the port is still taken, try again for ``retry_for``
        seconds, then fail with the reason."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                self.url = self.process.start()
                self.process.stderr_lines = 0  # once is enough: restarts log the same
                return
            except SpawnError as exc:
                if time.monotonic() + _RESTART_PAUSE_S > deadline:
                    raise SpawnError(f"instance {self.index + 1} could not be started on "
                                     f"port {self.port}: {exc}") from None
                time.sleep(_RESTART_PAUSE_S)

    def wait_exit(self) -> None:
        """Wait for the process to exit after a signal (SIGKILL if it takes too long)."""
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.signal(signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)


@dataclass
class Fleet:
    instances: list[Instance]

    @property
    def urls(self) -> list[str]:
        return [i.url for i in self.instances]

    def wait_answering(self, timeout: float = HEAL_TIMEOUT) -> list[str]:
        """Wait until every instance answers; the URLs of those that do not."""
        return [i.url for i in self.instances if not _wait_answering(i.url, timeout)]


@contextlib.contextmanager
def spawned_fleet(count: int, tickets: int, store: str,
                  extra: Sequence[str] = ()) -> Iterator[Fleet]:
    """Start ``count`` services on one store, each on its own port outside the ephemeral
    range; stop them all (SIGCONT first) whatever happens."""
    fleet = Fleet([Instance(i, port, tickets, store, extra)
                   for i, port in enumerate(pick_ports(count))])
    try:
        for instance in fleet.instances:
            instance.start()
        yield fleet
    finally:
        for instance in fleet.instances:
            instance.process.close()


@dataclass
class FaultInjector:
    """Injects the planned faults from a thread of its own, once ``begin`` gives it the
    run's start; ``finish`` stops it and leaves every instance running (a pause is ended
    at once).  Use it as a context manager, inside the fleet's, so that it stops first."""

    fleet: Fleet
    plan: FaultPlan
    duration: float
    faults: list[Fault] = field(default_factory=list)
    error: str = ""

    def __post_init__(self) -> None:
        self.schedule = fault_schedule(self.plan, self.duration, len(self.fleet.instances))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._origin = 0.0

    def __enter__(self) -> FaultInjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def begin(self, origin: float) -> None:
        """Start injecting; ``origin`` is the run's start on the ``perf_counter`` clock.
        Calls after the first do nothing."""
        if self._thread is not None:
            return
        self._origin = origin
        self._thread = threading.Thread(target=self._run, name="fault-injector", daemon=True)
        self._thread.start()

    def stop_soon(self) -> None:
        """Inject no more, and end a pause in progress now (safe in a signal handler)."""
        self._stop.set()

    def finish(self) -> None:
        """Stop injecting; wait for the fault in progress to heal (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT + RESTART_RETRY_S + HEAL_TIMEOUT)

    def _now(self) -> float:
        return time.perf_counter() - self._origin

    def _run(self) -> None:
        last_allowed = self.duration - self.plan.every
        ready = 0.0  # when the booths have had half an interval since the last fault healed
        for planned in self.schedule:
            if self._stop.wait(max(max(planned.at, ready) - self._now(), 0.0)):
                return
            if self._now() >= last_allowed:
                return  # the previous fault took too long to heal: keep the last interval free
            try:
                self._inject(planned.kind, self.fleet.instances[planned.instance])
                ready = self._now() + self.plan.every / 2
            except Exception as exc:  # the run fails with the reason, told by the main thread
                self.error = str(exc) if isinstance(exc, SpawnError) else (
                    f"injecting {planned.kind} into instance {planned.instance + 1}: {exc!r}")
                return

    def _inject(self, kind: str, instance: Instance) -> None:
        process = instance.process
        fault = Fault(kind, instance.index, self._now())
        self.faults.append(fault)
        if kind == "pause":
            process.signal(signal.SIGSTOP)
            try:
                self._stop.wait(self.plan.pause_for)
            finally:
                process.signal(signal.SIGCONT)
        else:
            process.signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
            instance.wait_exit()
            instance.start()
        if _wait_answering(instance.url, HEAL_TIMEOUT):
            fault.healed_after = self._now() - fault.at


def tickets_between(faults: Sequence[Fault], purchases: Iterable[Purchase]) -> list[int]:
    """Tickets acknowledged (answered 200) between each fault and the next, the last one's
    until the end, by the time of the answer."""
    starts = [f.at for f in faults]
    counts = [0] * len(faults)
    for p in purchases:
        slot = bisect.bisect_right(starts, p.answered_at) - 1
        if p.answer == "sold" and slot >= 0:
            counts[slot] += len(p.serials)
    return counts


def longest_without_sale(faults: Sequence[Fault], purchases: Iterable[Purchase]
                         ) -> list[float | None]:
    """The downtime each fault caused as the buyers saw it: the longest stretch, from the
    fault until the next one (or the end), in which its instance sold nothing (None: it
    sold nothing at all after the fault)."""
    sales: dict[int, list[float]] = {}
    for p in purchases:
        for a in p.attempts:
            if a.outcome == "200":
                sales.setdefault(a.instance, []).append(a.end)
    for ends in sales.values():
        ends.sort()
    out: list[float | None] = []
    for n, f in enumerate(faults):
        until = faults[n + 1].at if n + 1 < len(faults) else math.inf
        ends = sales.get(f.instance, [])
        window = ends[bisect.bisect_left(ends, f.at):bisect.bisect_left(ends, until)]
        if not window:
            out.append(None)
            continue
        out.append(max(b - a for a, b in zip([f.at, *window], window, strict=False)))
    return out


def buyers_view(purchases: Sequence[Purchase]) -> dict[str, float | int]:
    """The downtime as buyers saw it: purchases that needed more than one attempt, the
    attempts they took, and the longest wait from a first attempt to the answer."""
    retried = [p for p in purchases if len(p.attempts) > 1]
    answers_ = Counter(p.answer for p in purchases)
    return {
        "purchases": len(purchases),
        "retried": len(retried),
        "retries": sum(len(p.attempts) - 1 for p in retried),
        "longest_wait_s": round(max((p.attempts[-1].end - p.attempts[0].start
                                     for p in retried), default=0.0), 3),
        **{f"answer_{a}": answers_[a] for a in ("sold", "sold_out", "rejected", "not_sold",
                                                   "unknown")},
    }


def totals_by_kind(faults: Sequence[Fault]) -> dict[str, int]:
    counts = Counter(f.kind for f in faults)
    return {kind: counts[kind] for kind in KINDS if counts[kind]}
