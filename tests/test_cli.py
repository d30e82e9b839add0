"""The command line: settings from flags and environment, exit codes, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from app.cli import build_parser
from app.settings import Settings, SettingsError, describe, load
from tests.conftest import server_process


def settings_from(argv: list[str], environ: dict[str, str]) -> Settings:
    return load(build_parser().parse_args(["serve", *argv]), environ)


def test_defaults() -> None:
    settings = settings_from([], {})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.threads, settings.tickets) == (
        "127.0.0.1", 8000, 4, 100)
    assert (settings.max_per_request, settings.max_body_bytes, settings.store) == (
        10, 1024, "memory")


def test_flag_beats_environment_beats_default() -> None:
    env = {"TICKETBOOTH_TICKETS": "7", "TICKETBOOTH_THREADS": "3",
           "TICKETBOOTH_ALLOW_UNSAFE": "yes"}
    settings = settings_from(["--tickets", "9"], env)
    assert (settings.tickets, settings.threads, settings.allow_unsafe) == (9, 3, True)


def test_every_setting_has_a_flag_a_variable_and_help() -> None:
    parser_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag, variable, _default, help_text in describe():
        assert flag in parser_help and variable in parser_help
        assert variable.startswith("TICKETBOOTH_") and help_text


@pytest.mark.parametrize(("argv", "environ", "fragment"), [
    (["--port", "abc"], {}, "--port: expected an integer"),
    (["--port", "70000"], {}, "--port: must be at most 65535"),
    (["--threads", "0"], {}, "--threads: must be at least 1"),
    (["--pool-size", "0"], {}, "--pool-size: must be at least 1"),
    ([], {"TICKETBOOTH_TICKETS": "-5"}, "TICKETBOOTH_TICKETS: must be at least 0"),
    ([], {"TICKETBOOTH_ALLOW_UNSAFE": "maybe"}, "expected true or false"),
    (["--chore-ms", "nan"], {}, "finite"),
    (["--host", " "], {}, "must not be empty"),
])
def test_invalid_settings_are_refused(argv: list[str], environ: dict[str, str],
                                      fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment):
        settings_from(argv, environ)


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *argv], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("argv", "env"), [
    (["serve", "--tickets", "many"], {}),
    (["serve", "--no-such-flag"], {}),
    (["serve"], {"TICKETBOOTH_PORT": "-1"}),
    (["serve", "--store", "unsafe-memory"], {}),
    (["serve", "--store", "carrier-pigeon://"], {}),
    ([], {}),
])
def test_bad_start_exits_2_with_one_line(argv: list[str], env: dict[str, str]) -> None:
    result = run_cli(*argv, env=env)
    assert result.returncode == 2
    if argv:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ticketbooth: error: "), result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_with_exit_0(signum: signal.Signals) -> None:
    with server_process("--tickets", "5") as (process, url):
        assert requests.post(f"{url}/buy", timeout=5).status_code == 200
        process.send_signal(signum)
        assert process.wait(timeout=3) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=2)


def test_unsafe_store_starts_only_when_allowed_and_warns() -> None:
    with server_process("--store", "unsafe-memory", "--allow-unsafe") as (process, url):
        assert requests.post(f"{url}/buy", timeout=5).status_code == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=5)
    assert "UNSAFE STORE" in stderr

