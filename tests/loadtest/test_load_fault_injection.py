"""``--faults``: the schedule, the keyed retries, checks 5 and 6, and real runs that kill,
stop and pause real services (SQLite, PostgreSQL with two instances, the forgetful memory
store), and clean up after themselves even when interrupted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.cli import parse_args, run
from loadtest.faultrun import run_length
from loadtest.faults import (
    Fault,
    FaultPlan,
    Instance,
    fault_schedule,
    longest_without_sale,
    pick_ports,
    tickets_between,
)
from loadtest.history import Attempt, Purchase, Reply, judge
from loadtest.keyed_checks import check_acknowledged_durable, check_retries_sold_once
from loadtest.spawn import SpawnError

# --- the schedule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "every", "times"),
    [
        (30, 2, [2.0 * k for k in range(1, 14)]),  # 2 .. 26: the last interval 28..30 is free
        (10, 2, [2.0, 4.0, 6.0]),
        (11, 1.5, [1.5, 3.0, 4.5, 6.0, 7.5, 9.0]),
        (4, 2, []),  # one interval then the last: no room
    ],
)
def test_schedule_keeps_the_first_and_last_interval_free(duration: float, every: float,
                                                         times: list[float]) -> None:
    planned = fault_schedule(FaultPlan(("kill",), every=every), duration, 1)
    assert [p.at for p in planned] == times


def test_kinds_and_instances_in_turn_or_from_a_seed() -> None:
    plan = FaultPlan(("kill", "term", "pause"))
    turns = fault_schedule(plan, 20, 2)
    assert [(p.kind, p.instance) for p in turns[:4]] == [
        ("kill", 0), ("term", 1), ("pause", 0), ("kill", 1)]
    seeded = FaultPlan(("kill", "term", "pause"), seed=7)
    first = [(p.kind, p.instance) for p in fault_schedule(seeded, 20, 2)]
    assert first == [(p.kind, p.instance) for p in fault_schedule(seeded, 20, 2)]
    other = FaultPlan(("kill", "term", "pause"), seed=8)
    assert first != [(p.kind, p.instance) for p in fault_schedule(other, 20, 2)]


def test_ports_lie_outside_the_ephemeral_range() -> None:
    ports = pick_ports(20, ephemeral=(32768, 60999))
    assert len(set(ports)) == 20
    assert all(1024 <= p < 32768 or p > 60999 for p in ports)


def test_a_restart_whose_port_stays_taken_fails_with_the_reason() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", pick_ports(1)[0]))
        holder.listen(1)
        port = holder.getsockname()[1]
        instance = Instance(0, port, 10, "memory", ())
        try:
            with pytest.raises(SpawnError, match=f"instance 1 could not be started on port {port}"):
                instance.start(retry_for=0.5)
        finally:
            instance.process.close()
    assert instance.process.proc is None


# --- keyed purchases: what is a definite answer ----------------------------------------------


def _body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("reply", "outcome", "answer"),
    [
        (Reply(200, _body(tickets=[{"serial": 4}, {"serial": 5}])), "200", "sold"),
        (Reply(409, _body(error="sold_out")), "409 sold_out", "sold_out"),
        (Reply(400, _body(error="invalid_quantity")), "400 invalid_quantity", "rejected"),
        (Reply(422, _body(error="idempotency_key_reuse")), "422 idempotency_key_reuse",
         "rejected"),
        (Reply(409, _body(error="idempotency_key_in_flight")), "409 idempotency_key_in_flight",
         None),
        (Reply(503, _body(error="store_unavailable")), "503 store_unavailable", None),
        (Reply(504, _body(error="outcome_unknown")), "504 outcome_unknown", None),
        (Reply(500, b"<html>"), "500", None),
        (Reply(200, b"not json"), "200 unreadable", None),
        (Reply(None, failure="refused", maybe_sent=False), "refused", None),
        (Reply(None, failure="other", maybe_sent=False), "connect", None),
        (Reply(None, failure="reset"), "reset", None),
        (Reply(None, failure="timeout"), "timeout", None),
    ],
)
def test_judge_tells_definite_answers(reply: Reply, outcome: str, answer: str | None) -> None:
    assert judge(reply)[:2] == (outcome, answer)


# --- checks 5 and 6 on recorded histories ----------------------------------------------------


def _sold(key: str, *serials: int, retried: tuple[str, ...] = ()) -> Purchase:
    attempts = [Attempt(0.0, 0.1, 0, outcome) for outcome in retried]
    attempts.append(Attempt(0.2, 0.3, 0, "200", 200, serials))
    return Purchase(key, len(serials), 1, attempts, "sold", serials)


CLEAN = [_sold("a", 1), _sold("b", 2, 3, retried=("reset", "refused")), _sold("c", 4)]

# Each history breaks check 6 in one way.
BROKEN = [
    pytest.param([*CLEAN, _sold("d", 3)], "1 serials were handed out under more than one key",
                 id="serial-under-two-keys"),
    pytest.param([_sold("a", 1), Purchase("b", 1, 1, [Attempt(0, 1, 0, "200", 200, (2,)),
                                                      Attempt(1, 2, 0, "200", 200, (5,))],
                                          "sold", (2,))],
                 "1 keys got answers that disagree", id="replay-with-other-serials"),
    pytest.param([Purchase("a", 1, 1, [Attempt(0, 1, 0, "409 sold_out", 409),
                                       Attempt(1, 2, 0, "200", 200, (1,))], "sold", (1,))],
                 "1 keys got answers that disagree", id="sold-out-then-sold"),
]


def test_clean_history_passes_checks_5_and_6() -> None:
    assert check_retries_sold_once(CLEAN).passed
    assert check_acknowledged_durable([1, 2, 3, 4], missing=[]).passed


@pytest.mark.parametrize(("history", "detail"), BROKEN)
def test_check_6_catches(history: list[Purchase], detail: str) -> None:
    result = check_retries_sold_once(history)
    assert not result.passed
    assert detail in result.detail
    assert check_acknowledged_durable([s for p in history for s in p.serials], []).passed


@pytest.mark.parametrize(
    ("missing", "error", "detail"),
    [([3], "", "1 of 4 acknowledged serials are not sold"),
     ([2, 4], "", "2 of 4 acknowledged serials are not sold"),
     ([], "GET /tickets/1: HTTP 500", "could not look the tickets up")],
)
def test_check_5_catches(missing: list[int], error: str, detail: str) -> None:
    result = check_acknowledged_durable([1, 2, 3, 4], missing, error)
    assert not result.passed
    assert detail in result.detail
    assert check_retries_sold_once(CLEAN).passed


def test_tickets_between_faults_count_by_answer_time() -> None:
    faults = [Fault("kill", 0, 1.0), Fault("pause", 0, 2.0)]

    def at(t: float, *serials: int) -> Purchase:
        return Purchase("k", 1, 1, [Attempt(t - 0.1, t, 0, "200", 200, serials)], "sold",
                        serials)

    purchases = [at(0.5, 1), at(1.5, 2, 3), at(1.9, 4), at(2.5, 5), at(9.0, 6)]
    assert tickets_between(faults, purchases) == [3, 2]


def test_downtime_is_the_longest_stretch_without_a_sale_on_the_faulted_instance() -> None:
    faults = [Fault("kill", 0, 1.0), Fault("pause", 1, 2.0), Fault("kill", 0, 5.0)]
    attempts = [
        Attempt(0.8, 0.9, 0, "200", 200, (1,)),  # before the first fault: not counted
        Attempt(1.0, 1.05, 0, "200", 200, (2,)),  # in flight at the kill, answered: 0.05
        Attempt(1.1, 1.2, 0, "refused"),
        Attempt(1.6, 1.75, 0, "200", 200, (3,)),  # the first after the restart: 0.7 s gap
        Attempt(2.1, 3.0, 1, "200", 200, (4,)),  # the paused instance: 1.0 s from its fault
        Attempt(3.1, 3.2, 1, "200", 200, (5,)),
        Attempt(3.2, 3.3, 0, "200", 200, (6,)),  # instance 1 after the second fault: ignored
    ]
    purchases = [Purchase("k", 1, 1, attempts, "sold", (6,))]
    assert longest_without_sale(faults, purchases) == [
        pytest.approx(0.7), pytest.approx(1.0), None]


# --- usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--faults", "kill", "--duration", "10"], "--faults needs --spawn and --duration"),
        (["--spawn", "--faults", "kill"], "--faults needs --spawn and --duration"),
        (["--spawn", "--faults", "kill,explode", "--duration", "10"], "comma-separated list"),
        (["--spawn", "--faults", "kill", "--duration", "3"], "leaves no room for a fault"),
        (["--spawn", "--faults", "kill", "--stages", "2s:10,1s:10"],
         "leaves no room for a fault"),
        (["--spawn", "--pause-for", "3"], "--pause-for only apply with --faults"),
        (["--spawn", "--instances", "2"], "needs a postgresql:// --store"),
        (["--instances", "2"], "--instances only applies with --spawn"),
        (["--spawn", "--history", "h.jsonl"], "only apply with --idempotent or --faults"),
        (["--spawn", "--idempotent", "--history", "/no/such/dir/h"], "existing directory"),
    ],
)
def test_fault_usage_errors_exit_2(argv: list[str], message: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("error:") == 1


@pytest.mark.parametrize(("argv", "seconds"), [
    (["--duration", "12"], 12.0),
    (["--stages", "4s:10,1m:20"], 64.0),  # the stages' total
    ([], None),  # until sold out: no end to fit faults into
])
def test_faults_fit_into_the_run_a_duration_or_stages_give(argv: list[str],
                                                          seconds: float | None) -> None:
    assert run_length(parse_args(["--spawn", *argv])) == seconds


def test_help_lists_the_fault_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--faults", "--fault-every", "--pause-for", "--seed", "--instances",
                   "--idempotent", "--retry-for", "--history"):
        assert f"  {option} " in out


# --- real runs -----------------------------------------------------------------------------


def _result(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _history(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sqlite_survives_kill_term_and_pause(tmp_path: Path) -> None:
    """At least five faults of every kind, sales after each, and every check passes. (A
    restart takes up to 3 s on a busy machine, and the next fault waits for it and half an
    interval more: the duration leaves room for five of them then.)"""
    out, history = tmp_path / "run.json", tmp_path / "history.jsonl"
    status = run(["--spawn", "--store", f"sqlite:///{tmp_path / 'chaos.db'}",
                  "--faults", "kill,term,pause", "--fault-every", "1", "--duration", "15",
                  "--booths", "4", "--rate", "200", "--json", str(out), "--history",
                  str(history), "--quiet"])
    data = _result(out)
    assert status == 0, data["checks"]
    faults = data["faults"]
    assert len(faults["injected"]) >= 5
    assert set(faults["totals"]) == {"kill", "term", "pause"}
    assert all(f["healed_after_s"] is not None for f in faults["injected"])
    assert all(f["longest_without_sale_s"] is not None for f in faults["injected"])
    # More than the 4 purchases in flight at each fault: new ones sold between faults.
    assert all(f["tickets_until_next"] > 4 for f in faults["injected"]), faults["injected"]
    assert [c["name"] for c in data["checks"]][4:] == ["acknowledged-durable",
                                                       "retries-sold-once"]
    assert all(c["passed"] for c in data["checks"])
    # The faults made purchases retry, and every retried purchase ended with an answer.
    purchases = _history(history)
    assert len(purchases) == faults["buyers"]["purchases"]
    retried = [p for p in purchases if len(p["attempts"]) > 1]
    assert retried and faults["buyers"]["retried"] == len(retried)
    assert data["tickets_unknown"] == 0
    assert data["tickets_acknowledged"] == sum(len(p["serials"]) for p in purchases)
    assert data["tickets_acknowledged"] == (data["remaining_after"]["sold"]
                                            - data["remaining_before"]["sold"])


def test_memory_store_forgets_and_the_checks_say_so(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Killed, the memory store comes back with a fresh stock: the sales acknowledged before
    the kill are no longer counted, so check 4 fails whenever the booths bought anything
    before it (asserted), and the serials are handed out again after it."""
    out = tmp_path / "run.json"
    status = run(["--spawn", "--store", "memory", "--faults", "kill", "--fault-every", "1.5",
                  "--duration", "5", "--booths", "4", "--rate", "300", "--json", str(out),
                  "--quiet"])
    data = _result(out)
    assert status == 1
    first_fault = data["faults"]["injected"][0]["at_s"]
    sold_before = [t for t in data["timeseries"] if t["t"] + 1 <= first_fault and t["ok"]]
    assert sold_before, "nothing sold before the first kill: the run proves nothing"
    failed = {c["name"] for c in data["checks"] if not c["passed"]}
    assert {"sales-accounted", "no-duplicate-serials", "retries-sold-once"} <= failed
    assert "FAIL: " in capsys.readouterr().out


def test_postgresql_two_instances_one_killed_while_the_other_sells(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = request.getfixturevalue("postgres_server").new_database()
    out, history = tmp_path / "run.json", tmp_path / "history.jsonl"
    status = run(["--spawn", "--store", store, "--instances", "2", "--faults", "kill",
                  "--fault-every", "1.5", "--duration", "8", "--booths", "4", "--rate", "200",
                  "--json", str(out), "--history", str(history), "--quiet"])
    data = _result(out)
    assert status == 0, data["checks"]
    assert len(set(data["config"]["urls"])) == 2
    # A restart takes seconds on a busy machine, and the next fault waits for it, so how many
    # faults fit varies; they take the instances in turn.
    injected = data["faults"]["injected"]
    assert injected
    assert [f["instance"] for f in injected] == [1 + i % 2 for i in range(len(injected))]
    sold = [(a["end"], a["instance"]) for p in _history(history) for a in p["attempts"]
            if a["outcome"] == "200"]
    for fault in injected:
        down_until = fault["at_s"] + fault["healed_after_s"]
        others = [t for t, i in sold if i != fault["instance"] and fault["at_s"] < t < down_until]
        assert others, f"no sale on the other instance while {fault} was down"


def _processes_naming(text: str) -> list[tuple[int, str]]:
    """(pid, state) of every process whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append((int(entry.name), state))
    return found


@pytest.fixture
def generator(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m loadtest`` with a long pause fault; killed at the end if still running."""
    store = f"sqlite:///{tmp_path / 'interrupted.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "--spawn", "--store", store, "--faults", "pause",
         "--pause-for", "120", "--fault-every", "0.5", "--duration", "60", "--booths", "2",
         "--rate", "50", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc, store
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid, _state in _processes_naming(store):  # never leave one behind, pass or fail
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_while_paused_leaves_no_service_behind(
        generator: tuple[subprocess.Popen[bytes], str], signum: int) -> None:
    proc, store = generator
    deadline = time.monotonic() + 60
    while not any(state == "T" for _pid, state in _processes_naming(store)):
        assert proc.poll() is None, "the generator ended before its pause fault"
        assert time.monotonic() < deadline, "the service was never paused"
        time.sleep(0.05)  # readiness poll
    proc.send_signal(signum)
    # Generous: continuing, healing, reading the stock and stopping take a second or two; the
    # bound only says that an interrupted run ends instead of waiting out its pause.
    assert proc.wait(60) == 130
    assert _processes_naming(store) == []
