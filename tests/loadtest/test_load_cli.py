"""Command-line handling that needs no service: usage errors and an unreachable service."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.cli import build_parser, missing_extra, run


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--booths", "0"], "must be at least 1"),
        (["--quantity", "x"], "not a whole number"),
        (["--duration", "-1"], "must be a finite number above 0"),
        (["--rate", "0"], "must be a finite number above 0"),
        (["--think", "-5"], "0 or more"),
        (["--max-error-rate", "1.5"], "fraction between 0 and 1"),
        (["--url", "127.0.0.1:8000"], "not an http:// or https:// URL"),
        (["--spawn", "--url", "http://127.0.0.1:8000"], "do not give --url"),
        (["--tickets", "5"], "only apply with --spawn"),
        (["--store", "memory"], "only apply with --spawn"),
        (["--rate", "100", "--think", "5"], "closed loop only"),
        (["--json", "/no/such/dir/out.json"], "no such directory"),
        (["--plot", "-"], "needs a file path"),
        (["--no-such-option"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "installed", "missing"), [
    (["--plot", "run.png"], set(), "--plot needs matplotlib, which is not installed: "
                                   "pip install 'ticketbooth[plot]'"),
    (["--plot", "run.png"], {"matplotlib"}, None),
    ([], set(), None),
])
def test_missing_extra(argv: list[str], installed: set[str], missing: str | None) -> None:
    assert missing_extra(build_parser().parse_args(argv), installed.__contains__) == missing


def test_plot_without_matplotlib_exits_2_with_one_line_before_the_run(
        tmp_path: Path, dead_url: str) -> None:
    """matplotlib hidden from a real ``python -m loadtest``: nothing is sent, nothing written."""
    hide = ("import sys; sys.modules['matplotlib'] = None; "
            "from loadtest import main; raise SystemExit(main())")
    result = subprocess.run(
        [sys.executable, "-c", hide, "--url", dead_url,
         "--plot", str(tmp_path / "run.png")],
        capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("ticketbooth-load: error: --plot needs matplotlib, which is not "
                             "installed: pip install 'ticketbooth[plot]'\n")
    assert not (tmp_path / "run.png").exists()


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--url", "--booths", "--quantity", "--requests", "--duration", "--rate",
                   "--think", "--timeout", "--json", "--plot", "--quiet", "--spawn",
                   "--tickets", "--store", "--server-arg", "--max-p99-ms", "--max-error-rate"):
        assert option in out


def test_nothing_listening_exits_2_with_one_clear_line(dead_url: str, tmp_path: Path) -> None:
    """Through ``python -m loadtest``, as a user would run it."""
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--url", dead_url, "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"ticketbooth-load: error: cannot reach the service at {dead_url}/remaining: "
        "connection refused (is the service running?)\n")
    assert not (tmp_path / "r.json").exists()


def _read_terminal(fd: int, limit_s: float = 60.0) -> bytes:
    """Everything written to a pseudo-terminal until its other side is closed (bounded)."""
    chunks = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the writer has gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_progress_bar_on_a_terminal() -> None:
    """With stdout a terminal a tqdm bar shows (tests in pipes check it does not)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest", "--spawn", "--tickets", "200", "--think", "2"],
            stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.DEVNULL,
        )
        os.close(slave)
        output = _read_terminal(master).decode(errors="replace")
        assert proc.wait(60) == 0
    finally:
        os.close(master)
    assert "/200" in output and "ticket" in output  # the bar: n/200 tickets
    assert "\r" in output
    assert "PASS: all 4 checks passed" in output
