"""``--stages``: the stage arithmetic (pure, exact), the per-stage breakdown of what the booths
recorded, and the command line's parsing of it."""

from __future__ import annotations

import pytest

from loadtest.booths import LoadPlan
from loadtest.cli import run
from loadtest.stage_report import lateness, stage_rows
from loadtest.stages import Schedule, Stage, parse_duration, parse_stages
from loadtest.stats import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_SOLD_OUT, BoothStats

#: A ramp 0 -> 100/s over 10 s (N = 5 t^2), a plateau at 100/s for 10 s (N = 500 + 100 u),
#: a ramp down to 0 over 10 s (N = 1500 + 100 u - 5 u^2): 500 + 1000 + 500 requests.
RAMP_PLATEAU_DOWN = Schedule((Stage(10, 100), Stage(10, 100), Stage(10, 0)))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("1.5m", 90.0), ("2h", 7200.0), (" 0.25s ", 0.25), (".5s", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "stages"),
    [("10s:100", (Stage(10, 100),)),
     ("10s:100,30s:2000,20s:2000,10s:0",
      (Stage(10, 100), Stage(30, 2000), Stage(20, 2000), Stage(10, 0))),
     ("1m:0.5, 1h:7", (Stage(60, 0.5), Stage(3600, 7)))],
)
def test_parse_stages(text: str, stages: tuple[Stage, ...]) -> None:
    assert parse_stages(text) == stages


@pytest.mark.parametrize(
    ("k", "seconds"),
    [(0, 0.0), (5, 1.0), (20, 2.0), (125, 5.0), (405, 9.0),  # the ramp: t = sqrt(k / 5)
     (500, 10.0), (501, 10.01), (600, 11.0), (1499, 19.99),  # the plateau: 10 + (k - 500) / 100
     (1500, 20.0), (1595, 21.0), (1820, 24.0), (1995, 29.0)],  # down: 100u - 5u^2 = k - 1500
)
def test_send_times_of_ramp_plateau_and_ramp_down(k: int, seconds: float) -> None:
    assert RAMP_PLATEAU_DOWN.send_time(k) == pytest.approx(seconds, abs=1e-9)


def test_counts_of_ramp_plateau_and_ramp_down() -> None:
    s = RAMP_PLATEAU_DOWN
    assert s.total == 2000
    assert s.scheduled() == [500, 1000, 500]
    assert s.duration == 30.0
    assert s.bounds == (0.0, 10.0, 20.0, 30.0)
    assert s.start_rates == (0.0, 100.0, 100.0)
    assert [s.rate_at(t) for t in (0, 5, 10, 15, 25, 29.5, 30, 31)] == [
        0, 50, 100, 100, 50, 5, 0, 0]
    times = [s.send_time(k) for k in range(s.total)]
    assert times == sorted(times) and times[-1] < s.duration
    with pytest.raises(IndexError):
        s.send_time(2000)


def test_plateau_is_the_constant_rate() -> None:
    """A plateau from a start rate sends at k / r, exactly as --rate r does."""
    s = Schedule((Stage(2, 250),), start_rate=250)
    assert s.total == 500
    assert [s.send_time(k) for k in range(500)] == pytest.approx([k / 250 for k in range(500)],
                                                                 abs=1e-12)


@pytest.mark.parametrize(
    ("stages", "start", "scheduled"),
    [
        # Stages of different lengths: 1 s 0->10 (5), 4 s at 10 (40), 0.5 s 10->30 (10).
        ((Stage(1, 10), Stage(4, 10), Stage(0.5, 30)), 0.0, [5, 40, 10]),
        # A stage at rest holds no request; the next begins at its end.
        ((Stage(3, 0), Stage(2, 10)), 0.0, [0, 10]),
        # Fractional requests: 1 s 0->3 is 1.5 due, so the requests 0 and 1; then 1.5 more.
        ((Stage(1, 3), Stage(0.5, 3)), 0.0, [2, 1]),
        # From a start rate, down to 0.
        ((Stage(4, 0),), 50.0, [100]),
    ],
)
def test_scheduled_per_stage(stages: tuple[Stage, ...], start: float,
                             scheduled: list[int]) -> None:
    s = Schedule(stages, start_rate=start)
    assert s.scheduled() == scheduled
    assert s.total == sum(scheduled)
    # Each stage's requests are due within it.
    firsts = [sum(scheduled[:i]) for i in range(len(scheduled))]
    for i, (first, count) in enumerate(zip(firsts, scheduled, strict=True)):
        for k in range(first, first + count):
            assert s.bounds[i] <= s.send_time(k) < s.bounds[i + 1], (i, k)


def test_a_stage_at_rest_delays_the_next() -> None:
    s = Schedule((Stage(3, 0), Stage(2, 10)))  # then N = 2.5 u^2
    assert s.send_time(0) == 3.0
    assert s.send_time(4) == pytest.approx(3.0 + (4 / 2.5) ** 0.5)
    assert s.stage_of(2.9) == 0 and s.stage_of(3.0) == 1 and s.stage_of(99) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [("10", "stage 1 ('10'): not DURATION:RATE"),
     ("10:100", "not a duration with a unit s, m or h: '10'"),
     ("10s:100,5x:3", "stage 2 ('5x:3'): not a duration with a unit"),
     ("0s:100", "a stage must last more than 0 s"),
     ("10s:fast", "the rate is not a number: 'fast'"),
     ("10s:-1", "the rate must be a finite number 0 or more"),
     ("10s:inf", "the rate must be a finite number 0 or more"),
     ("10s:100,", "stage 2 (''): not DURATION:RATE")],
)
def test_parse_errors_name_the_stage(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_stages(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--stages", "10s"], "argument --stages: stage 1 ('10s'): not DURATION:RATE"),
     (["--stages", "10s:0,5s:0"], "schedules no request at all"),
     (["--stages", "10s:5", "--rate", "10"], "do not give --rate with it"),
     (["--stages", "10s:5", "--duration", "3", "--requests", "9"],
      "do not give --duration, --requests with it"),
     (["--stages", "10s:5", "--think", "2"], "do not give --think with it"),
     (["--start-rate", "5"], "--start-rate only applies with --stages"),
     (["--start-rate", "-5", "--stages", "1s:1"], "must be a finite number 0 or more"),
     (["--html", "-"], "--html needs a file path"),
     (["--csv", "-"], "--csv needs a file path"),
     (["--csv", "/no/such/dir/x.csv"], "no such directory"),
     (["--html", "/no/such/dir/x.html"], "no such directory")],
)
def test_cli_usage_errors_exit_2(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_help_lists_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--stages", "--start-rate", "--html", "--csv", "compare BASE.json NEW.json"):
        assert option in out


def _booth(number: int, requests: list[tuple[float, list[tuple[int, int]]]]) -> BoothStats:
    """A booth's stats: each request's actual send time and its records (latency_us, outcome),
    as the open loop writes them."""
    stats = BoothStats(booth=number, url="http://127.0.0.1:1")
    for sent, records in requests:
        stats.sent_at.append(sent)
        stats.sent_record.append(len(stats.outcome))
        for latency_us, outcome in records:
            stats.record(sent + latency_us / 1e6, latency_us, outcome)
    return stats


def test_stage_breakdown_and_lateness() -> None:
    """Two stages at 2/s: slots 0..3 due at 0, 0.5, 1, 1.5; booth 1 holds 0 and 2, booth 2 holds
    1 and 3. Slot 2 is sent 20 ms late and records two attempts (an error, then a sale)."""
    plan = LoadPlan(urls=("http://127.0.0.1:1",), booths=2, duration=2.0,
                    schedule=Schedule((Stage(1, 2), Stage(1, 2)), start_rate=2))
    booths = [_booth(1, [(0.0, [(10_000, OUTCOME_OK)]),
                         (1.02, [(25_000, OUTCOME_ERROR), (30_000, OUTCOME_OK)])]),
              _booth(2, [(0.5, [(5_000, OUTCOME_OK)]), (1.5, [(3_000, OUTCOME_SOLD_OUT)])])]
    rows = stage_rows(plan, booths)
    assert rows is not None
    assert [(r["scheduled"], r["sent"], r["achieved_rps"], r["target_rps"], r["late"])
            for r in rows] == [(2, 2, 2.0, 2.0, 0), (2, 2, 2.0, 2.0, 1)]
    assert [(r["ok"], r["sold_out"], r["errors"]) for r in rows] == [(2, 0, 0), (1, 1, 1)]
    assert rows[0]["latency_ms"] == {"p50": 5.0, "p90": 10.0, "p99": 10.0}
    assert rows[1]["latency_ms"] == {"p50": 25.0, "p90": 30.0, "p99": 30.0}
    assert [(r["start_s"], r["start_rate"], r["end_rate"]) for r in rows] == [(0, 2, 2),
                                                                              (1, 2, 2)]
    late = lateness(plan, booths)
    assert late is not None
    assert (late["sent"], late["late"], late["threshold_ms"]) == (4, 1, 10.0)
    assert late["max_ms"] == pytest.approx(20.0)
    assert stage_rows(LoadPlan(urls=plan.urls, rate=2.0), booths) is None
    assert lateness(LoadPlan(urls=plan.urls), booths) is None  # closed loop
