"""The bench's processes: CPU pinning, and servers started, awaited and always stopped.

A server is a subprocess in its own process group (a Ctrl-C at the terminal reaches the
bench, which then stops its servers itself). Its stdout goes to a file, polled for the
line that gives its URL; its stderr (the access log: one line per request) goes to a log
file, never to a pipe that nobody reads, which would block the server once full. Every
wait is bounded; stopping is SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BenchError", "Pinning", "ServerProcess", "detect_pinning", "filesystem_of",
           "process_cpu_seconds", "tree_cpu_seconds", "user_cpu_seconds"]

#: Seconds a server may take to say it is listening.
START_TIMEOUT = 30.0
#: Seconds a server may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
_TICKS = os.sysconf("SC_CLK_TCK")
#: The line a server prints once it accepts: an HTTP server, or the delay proxy (tcp://).
_URL = re.compile(r"listening on ((?:http|tcp)://127\.0\.0\.1:\d+)\s*$")


class BenchError(Exception):
    """The bench itself cannot go on (a missing tool, a server that would not start)."""


@dataclass(frozen=True)
class Pinning:
    """Where the servers and the load run: ``taskset`` prefixes, or none."""

    pinned: bool
    server_cpus: str | None
    load_cpus: str | None
    note: str

    @property
    def cores(self) -> list[int] | None:
        """The CPUs the bench uses, or None for all of them (unpinned)."""
        if self.server_cpus is None or self.load_cpus is None:
            return None
        return [int(self.server_cpus), int(self.load_cpus)]

    def server(self, command: Sequence[str]) -> list[str]:
        return ["taskset", "-c", self.server_cpus, *command] if self.server_cpus else [*command]

    def load(self, command: Sequence[str]) -> list[str]:
        return ["taskset", "-c", self.load_cpus, *command] if self.load_cpus else [*command]


def detect_pinning(enabled: bool = True) -> Pinning:
    """Servers on the first CPU we may use, load on the second, when taskset works."""
    if not enabled:
        return Pinning(False, None, None, "unpinned (--no-pin)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning(False, None, None,
                       f"unpinned: only {len(cpus)} CPU available, servers and load share it")
    if shutil.which("taskset") is None:
        return Pinning(False, None, None, "unpinned: taskset not found (util-linux)")
    server, load = str(cpus[0]), str(cpus[1])
    try:
        probe = subprocess.run(["taskset", "-c", load, "true"], capture_output=True,
                               timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Pinning(False, None, None, f"unpinned: taskset does not work here ({exc})")
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip()
        return Pinning(False, None, None, f"unpinned: taskset does not work here ({reason})")
    return Pinning(True, server, load,
                   f"servers (and PostgreSQL) pinned to CPU {server}, load generators to "
                   f"CPU {load} (taskset)")


def user_cpu_seconds(cores: Sequence[int] | None) -> float:
    """Seconds the given CPUs (all when None) have run user code, anyone's, or were stolen
    by the hypervisor, since boot: user, nice and steal in /proc/stat.

    Only user time is compared with the bench's own (see :func:`process_cpu_seconds`):
    kernel work done while a CPU would otherwise idle (interrupts, wake-ups, loopback
    delivery) is charged to no process, and would look like a neighbour when the server's
    CPU is not full. What other users of the machine run (tests, builds) is user code."""
    user = 0
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                name, *values = line.split()
                if not (name.startswith("cpu") and name[3:].isdigit()):
                    continue
                if cores is None or int(name[3:]) in cores:
                    ticks = [int(v) for v in values]
                    user += ticks[0] + ticks[1] + ticks[7]
    except (OSError, ValueError, IndexError):
        return 0.0
    return user / _TICKS


def process_cpu_seconds(pid: int, *, user_only: bool = False) -> float:
    """CPU time (user + system, or user only; every thread) process ``pid`` has used; 0 if
    it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # After "pid (comm)", fields[0] is field 3 of proc(5): utime is 14, stime 15.
    return (int(fields[11]) + (0 if user_only else int(fields[12]))) / _TICKS


def tree_cpu_seconds(pid: int, *, user_only: bool = False) -> float:
    """CPU time of ``pid`` and its children (e.g. PostgreSQL's postmaster and backends)."""
    total = process_cpu_seconds(pid, user_only=user_only)
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
            kids = [int(c) for c in children.read().split()]
    except (OSError, ValueError):
        kids = []
    return total + sum(process_cpu_seconds(kid, user_only=user_only) for kid in kids)


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), or "unknown"."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1]
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return "unknown"
    return kind


class ServerProcess:
    """One server subprocess: started, awaited until it prints its URL, then stopped."""

    def __init__(self, name: str, command: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.command = list(command)
        self.stdout_path = log_dir / f"{name}.out"
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "wb") as out, open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=log, env=env,
                                             process_group=0)
            except OSError as exc:
                raise BenchError(f"cannot start {self.name} ({' '.join(self.command)}): "
                                 f"{exc}") from exc

    def wait_listening(self, timeout: float = START_TIMEOUT) -> str:
        """Poll the stdout file for the URL line; the reason and log tail if it never comes."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout_path.read_text(errors="replace")
            for line in text.splitlines():
                match = _URL.search(line)
                if match:
                    self.url = match.group(1)
                    return self.url
            status = self.proc.poll()
            if status is not None:
                raise BenchError(f"{self.name} exited with status {status} before it was "
                                 f"listening; its log ends:\n{self.log_tail()}")
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not say it was listening within {timeout:g} s; "
                         f"its log ends:\n{self.log_tail()}")

    def probe(self, path: str, timeout: float = 10.0) -> None:
        """One request, answered 200, before any load: the server really serves."""
        url = self.url + path
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                answer.read()
        except (OSError, urllib.error.URLError) as exc:
            raise BenchError(f"{self.name} does not answer GET {url}: {exc}; its log "
                             f"ends:\n{self.log_tail()}") from exc

    def cpu_seconds(self, *, user_only: bool = False) -> float:
        """CPU time (user + system, or user only; every thread) the server has used."""
        if self.proc is None:
            return 0.0
        return process_cpu_seconds(self.proc.pid, user_only=user_only)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with status {self.proc.returncode} during "
                             f"the bench; its log ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 8192))
                tail = log.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(f"  | {line}" for line in tail) or "  | (empty)"

    def stop(self) -> None:
        """SIGTERM, a bounded wait, then SIGKILL. Safe to call twice."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"bench: {self.name} did not stop within {STOP_TIMEOUT:g} s of SIGTERM: "
                  "killing it", file=sys.stderr)
            proc.kill()
            proc.wait(STOP_TIMEOUT)
