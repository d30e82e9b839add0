"""The bench's load: one run of wrk or of ``ticketbooth-load``, read into a :class:`Run`.

wrk runs a small Lua script (written next to the logs) that sends ``POST /buy`` and, when
done, prints one line of JSON with its counts and HdrHistogram percentiles. With several
URLs (several instances of the service), the script points each wrk thread at one of them
(``thread.addr``), so the connections are split evenly over the instances and one wrk
reports for all. ``ticketbooth-load`` runs with ``--json -`` and is read from its JSON.
Every run has a bounded wait; a run that cannot be read is a :class:`BenchError`.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.procs import BenchError, Pinning
from loadtest.booths import PURCHASE_CONTENT_TYPE, purchase_body

__all__ = ["NoAnswer", "Run", "port_of", "run_ticketbooth_load", "run_wrk", "write_wrk_script",
           "wrk_version"]

#: wrk threads: 2, as wrk is usually run; each thread drives connections / 2 connections.
WRK_THREADS = 2
#: The load CPU counts as full (others then compete with the generator) past this.
LOAD_CPU_FULL = 0.9
#: Seconds past its duration a load run may take before it is stopped.
GRACE_S = 30.0
_RESULT = "BENCH-RESULT "

_WRK_SCRIPT = r"""
-- Written by bench/runner.py: POST /buy; each thread to one of PORTS; JSON when done.
wrk.method = "POST"
local ports = {%(ports)s}
local threads = 0
local keyed = %(keyed)s
local body = %(body)s
if body then
  wrk.body = body
  wrk.headers["Content-Type"] = %(content_type)s
end

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
  if #ports > 1 then
    local port = ports[(threads - 1) %% #ports + 1]
    thread.addr = wrk.lookup("127.0.0.1", tostring(port))[1]
  end
end

local nonce = "x"
local counter = 0
function init(args)
  nonce = args[1] or "x"
end

function request()
  if keyed then
    counter = counter + 1
    local headers = {["Idempotency-Key"] = nonce .. "-" .. id .. "-" .. counter}
    if body then
      headers["Content-Type"] = wrk.headers["Content-Type"]
    end
    return wrk.format(nil, nil, headers)
  end
  return wrk.format()
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"timeout":%%d,"non_2xx":%%d,"p50_us":%%.0f,"p90_us":%%.0f,"p99_us":%%.0f,' ..
    '"max_us":%%.0f,"mean_us":%%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


class NoAnswer(BenchError):
    """A run got no answer at all."""


@dataclass
class Run:
    """One load run: what was sent, how fast, how long it took."""

    tool: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    #: Failed requests by kind (socket errors; for wrk also timeouts).
    errors: dict[str, int] = field(default_factory=dict)
    #: Answers that were not 2xx or 3xx (e.g. 409 sold out, 503).
    non_2xx: int = 0
    #: Open loop only: the rate asked for.
    rate: float | None = None
    #: ticketbooth-load only: its exit status and failed checks.
    exit_status: int | None = None
    failed_checks: list[str] = field(default_factory=list)
    #: CPU the service processes used, in CPUs (1.0: one CPU all the time); less than 1 on
    #: a CPU-bound server hints that something else ran on its CPU.
    server_cpu: float | None = None
    #: CPU others (not the bench, its servers, PostgreSQL or its load) used during the run,
    #: in CPUs, on the servers' CPU (on every CPU when unpinned): this shared machine's noise.
    foreign_cpu: float | None = None
    #: The same on the load generator's CPU (None when unpinned).
    foreign_load_cpu: float | None = None
    #: CPU the load generator used, in CPUs: near 1.0 it was the bottleneck. It includes the
    #: delay proxy's, which runs on the load's CPU too.
    load_cpu: float | None = None
    #: CPU the delay proxy used, in CPUs (rows through the proxy only).
    proxy_cpu: float | None = None
    #: CPU PostgreSQL's processes (the postmaster and its children) used, in CPUs (rows on
    #: PostgreSQL only).
    db_cpu: float | None = None
    #: CPU time per sale (2xx answer), in microseconds: the service process(es), and
    #: PostgreSQL's processes (rows on PostgreSQL only). None when nothing was sold.
    service_us_per_sale: float | None = None
    db_us_per_sale: float | None = None
    #: Tickets sold per committed batch (rows on PostgreSQL only: its ``sales`` table has
    #: one row per batch that sold), None when nothing was committed.
    tickets_per_commit: float | None = None
    #: Runs redone because they got no answer at all (a stalled machine).
    retries: int = 0

    @property
    def noise(self) -> float:
        """How much others competed with the bench: all of their CPU on the servers' CPU,
        and on the load's CPU only what left the generator less than it wanted (a
        neighbour on an otherwise idle load CPU costs wrk nothing)."""
        noise = self.foreign_cpu or 0.0
        others, load = self.foreign_load_cpu or 0.0, self.load_cpu or 0.0
        if others + load > LOAD_CPU_FULL:
            noise += others
        return noise

    @property
    def sales(self) -> int:
        """Requests answered 2xx or 3xx: at the bench's stocks, one ticket sold each."""
        return max(0, self.requests - self.non_2xx)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "noise": round(self.noise, 3)}


def wrk_version() -> str:
    """wrk's version line, or a BenchError saying how to install it."""
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: `make bench` installs it from Debian's "
                         "packages (or run: apt-get install wrk)")
    try:
        probe = subprocess.run(["wrk", "--version"], capture_output=True, text=True,
                               timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"wrk does not run: {exc}") from exc
    text = (probe.stdout + probe.stderr).strip().splitlines()
    return text[0] if text else "wrk (unknown version)"


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable ASCII is a Lua string too


def write_wrk_script(path: Path, ports: Sequence[int], *, keyed: bool,
                     as_booths: bool = False) -> Path:
    """wrk's script: POST with no body, or (``as_booths``) the request a booth sends."""
    body = _lua_string(purchase_body(1).decode()) if as_booths else "nil"
    path.write_text(_WRK_SCRIPT % {"ports": ", ".join(str(p) for p in ports),
                                   "keyed": "true" if keyed else "false",
                                   "body": body,
                                   "content_type": _lua_string(PURCHASE_CONTENT_TYPE),
                                   "marker": _RESULT}, encoding="utf-8")
    return path


def port_of(url: str) -> int:
    """The port of ``url`` (``http://`` or ``tcp://``), or a BenchError."""
    port = urlsplit(url).port
    if port is None:
        raise BenchError(f"no port in {url!r}")
    return port


def run_wrk(urls: Sequence[str], *, duration: float, connections: int, pinning: Pinning,
            script_dir: Path, path: str = "/buy", keyed: bool = False,
            as_booths: bool = False, nonce: str = "x", allow_empty: bool = False) -> Run:
    """Closed loop: ``connections`` connections, each sending as soon as it has its answer."""
    if connections % WRK_THREADS or (connections // WRK_THREADS) < 1:
        raise BenchError(f"--connections must be a multiple of {WRK_THREADS}")
    if WRK_THREADS % len(urls):
        raise BenchError(f"wrk's {WRK_THREADS} threads cannot be split over {len(urls)} URLs")
    ports = [port_of(u) for u in urls]
    name = (f"wrk-{'-'.join(map(str, ports))}{'-keyed' if keyed else ''}"
            f"{'-as-booths' if as_booths else ''}.lua")
    script = write_wrk_script(script_dir / name, ports, keyed=keyed, as_booths=as_booths)
    seconds = max(1, math.ceil(duration))
    command = pinning.load(["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s",
                            "--timeout", "10s", "-s", str(script), urls[0] + path,
                            "--", nonce])
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=seconds + GRACE_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {seconds + GRACE_S:g} s") from None
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(_RESULT)), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed (exit {done.returncode}): "
                         f"{(done.stderr or done.stdout).strip()[-800:]}")
    data = json.loads(line[len(_RESULT):])
    if not data["requests"] and not allow_empty:
        raise NoAnswer(f"wrk got no answer at all from {', '.join(urls)} in {seconds} s")
    elapsed = data["duration_us"] / 1e6
    errors = {k: int(data[k]) for k in ("connect", "read", "write", "timeout")}
    return Run(tool="wrk", requests=int(data["requests"]), seconds=round(elapsed, 3),
               rps=data["requests"] / elapsed if elapsed else 0.0,
               p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000,
               p99_ms=data["p99_us"] / 1000, max_ms=data["max_us"] / 1000,
               errors=errors, non_2xx=int(data["non_2xx"]))



def run_ticketbooth_load(urls: Sequence[str], *, duration: float, booths: int,
                         pinning: Pinning, rate: float | None = None) -> Run:
    """``ticketbooth-load`` closed loop (or open loop at ``rate``), read from its JSON."""
    command = [sys.executable, "-m", "loadtest", "--booths", str(booths),
               "--duration", f"{duration:g}", "--json", "-", "--quiet"]
    for url in urls:
        command += ["--url", url]
    if rate is not None:
        command += ["--rate", f"{rate:.1f}"]
    try:
        done = subprocess.run(pinning.load(command), capture_output=True, text=True,
                              check=False, timeout=duration + GRACE_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"ticketbooth-load did not finish within {duration + GRACE_S:g} s"
                         ) from None
    # 0: every check passed; 1: a check failed (reported, the figures still stand).
    if done.returncode not in (0, 1):
        raise BenchError(f"ticketbooth-load failed (exit {done.returncode}): "
                         f"{done.stderr.strip()[-800:]}")
    try:
        data = json.loads(done.stdout)
    except ValueError:
        raise BenchError(f"ticketbooth-load wrote no JSON: {done.stderr.strip()[-800:]}"
                         ) from None
    latency = data["latency_ms"]
    statuses = {int(k): int(v) for k, v in data["status_counts"].items()}
    return Run(tool="ticketbooth-load", requests=int(data["requests"]),
               seconds=round(float(data["elapsed_s"]), 3), rps=float(data["throughput_rps"]),
               p50_ms=float(latency["p50"]), p90_ms=float(latency["p90"]),
               p99_ms=float(latency["p99"]), max_ms=float(latency["max"]),
               errors={k: int(v) for k, v in data["errors"].items()},
               non_2xx=sum(n for code, n in statuses.items() if not 200 <= code < 400),
               rate=rate, exit_status=done.returncode,
               failed_checks=[c["name"] for c in data["checks"] if not c["passed"]])
