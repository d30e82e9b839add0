"""The command line: settings from flags and environment, exit codes, signals."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from app.cli import build_parser
from app.listening import resolve
from app.settings import Settings, SettingsError, describe, load
from tests.conftest import poll, run_cli, service_process


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


@pytest.fixture(scope="module")
def port_in_use() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize(("argv", "fragment"), [
    (["serve", "--tickets", "many"], "--tickets"),
    (["serve", "--no-such-flag"], "--no-such-flag"),
    (["serve", "--port", "-1"], "--port"),
    (["serve", "--store", "unsafe-memory"], "--allow-unsafe"),
    (["serve", "--store", "carrier-pigeon://"], "carrier-pigeon"),
    (["serve", "--host", "no.such.name"], "--host no.such.name: cannot be resolved"),
    (["serve", "--host", "127.0.0.1,no.such.name"], "--host no.such.name"),
    # TEST-NET-1 (RFC 5737): an address that is on no machine, so not on this one.
    (["serve", "--host", "192.0.2.1"], "cannot listen on 192.0.2.1:"),
    (["serve", "--port", "IN_USE"], "--port IN_USE: cannot listen on 127.0.0.1:IN_USE"),
    ([], ""),
])
def test_bad_start_exits_2_with_one_line(argv: list[str], fragment: str,
                                         port_in_use: int) -> None:
    argv = [arg.replace("IN_USE", str(port_in_use)) for arg in argv]
    result = run_cli(*argv)
    assert result.returncode == 2, result.stderr
    if argv:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ticketbooth: error: "), result.stderr
        assert fragment.replace("IN_USE", str(port_in_use)) in lines[0]
    assert result.stdout == ""


def test_bad_setting_from_the_environment_exits_2() -> None:
    result = run_cli("serve", env={"TICKETBOOTH_PORT": "-1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ticketbooth: error: TICKETBOOTH_PORT: must be at least 0, got -1"]


def test_every_address_of_the_host_is_listened_on_with_one_line_each(tmp_path: Path) -> None:
    """A host naming several addresses (as localhost does where it is both 127.0.0.1 and
    ::1) is served on each, on one port, with one listening line per address; the first
    line keeps its format. Sales on either are one stock, and parked (SQLite) on both."""
    store = f"sqlite:///{tmp_path / 'tickets.db'}"
    with service_process("--host", "127.0.0.1,::1", "--store", store,
                         "--tickets", "10") as service:
        poll(lambda: len(service.urls) == 2, "the second listening line")
        port = service.url.rsplit(":", 1)[1]
        assert service.urls == [f"http://127.0.0.1:{port}", f"http://[::1]:{port}"]
        first = requests.post(f"{service.urls[0]}/buy", timeout=10)
        second = requests.post(f"{service.urls[1]}/buy", json={"quantity": 2}, timeout=10)
        assert first.json() == {"tickets": [{"serial": 1}], "remaining": 9}
        assert second.json() == {"tickets": [{"serial": 2}, {"serial": 3}], "remaining": 7}
        for url in service.urls:
            assert requests.get(f"{url}/remaining", timeout=10).json()["sold"] == 3
        assert service.stop() == 0


@pytest.mark.parametrize(("host", "addresses"), [
    ("127.0.0.1", [("127.0.0.1", 8000)]),
    ("::1", [("::1", 8000, 0, 0)]),
    ("[::1]", [("::1", 8000, 0, 0)]),
    # IPv4 first, each address once, whatever order they were named in.
    ("::1, 127.0.0.1,::1", [("127.0.0.1", 8000), ("::1", 8000, 0, 0)]),
])
def test_resolve_lists_every_address_once_ipv4_first(host: str,
                                                     addresses: list[tuple[object, ...]]
                                                     ) -> None:
    assert [sockaddr for _family, sockaddr in resolve(host, 8000)] == addresses


@pytest.mark.skipif(len({info[4][0] for info in socket.getaddrinfo(
    "localhost", 0, type=socket.SOCK_STREAM)}) < 2,
    reason="localhost resolves to one address here; the test above covers several")
def test_host_localhost_with_two_addresses() -> None:
    with service_process("--host", "localhost") as service:
        poll(lambda: len(service.urls) == 2, "the second listening line")
        for url in service.urls:
            assert requests.get(f"{url}/remaining", timeout=10).status_code == 200


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_with_exit_0(signum: signal.Signals) -> None:
    with service_process("--tickets", "5") as service:
        assert requests.post(f"{service.url}/buy", timeout=5).status_code == 200
        service.process.send_signal(signum)
        # Generous: an idle server stops within a turn of its event loop; the bound only
        # keeps a server that ignores the signal from hanging the suite.
        assert service.process.wait(timeout=15) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{service.url}/healthz", timeout=2)


def test_unsafe_store_starts_only_when_allowed_and_warns(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr, service_process("--store", "unsafe-memory",
                                                  "--allow-unsafe", stderr=stderr) as service:
        assert requests.post(f"{service.url}/buy", timeout=5).status_code == 200
        assert service.stop() == 0
    assert "UNSAFE STORE" in log.read_text()


def test_postgres_store_without_its_extra_exits_2_naming_it() -> None:
    """psycopg hidden from a real ``ticketbooth serve``: one line that says what to install."""
    hide = ("import sys; sys.modules['psycopg'] = None; "
            "from app.cli import main; raise SystemExit(main())")
    result = subprocess.run(
        [sys.executable, "-c", hide, "serve", "--store", "postgresql://u@127.0.0.1:1/db"],
        capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "pip install 'ticketbooth[postgres]'" in lines[0], lines
