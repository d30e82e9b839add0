"""The one table of settings.

Every setting is a field of :class:`Settings`; its metadata holds the help text and the
bounds. From that one table come the ``--flag`` of the command line, the ``TICKETBOOTH_*``
environment variable and the README's table, so they cannot drift apart.

Precedence: command line, then environment, then the default. Nothing is read at import
time: :func:`load` is called once, at start-up, by the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "add_arguments", "describe", "load"]

ENV_PREFIX = "TICKETBOOTH_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message is one line for the user."""


def _setting(default: Any, help: str, *, minimum: float | None = None,
             maximum: float | None = None, choices: tuple[str, ...] = (),
             secret: bool = False, shown_default: str = "") -> Any:
    return field(default=default, metadata={
        "help": help, "minimum": minimum, "maximum": maximum, "choices": choices,
        "secret": secret, "shown_default": shown_default,
    })


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    host: str = _setting("127.0.0.1", "Interface to listen on (0.0.0.0 for every IPv4 "
                         "interface): an address, or a name, listened on at every address it "
                         "resolves to; several separated by commas (127.0.0.1,::1).")
    port: int = _setting(8000, "TCP port to listen on; 0 picks a free port.",
                         minimum=0, maximum=65535)
    threads: int = _setting(4, "Worker threads in waitress's pool.", minimum=1, maximum=1024)
    tickets: int = _setting(100, "Stock of tickets (serials 1..N) when a store is created.",
                            minimum=0, maximum=10**12)
    max_per_request: int = _setting(10, "Most tickets one POST /buy or POST /holds may take.",
                                    minimum=1, maximum=10_000)
    hold_ttl: int = _setting(600, "Seconds a hold (POST /holds) lasts when the request gives "
                             "no ttl_s.", minimum=1, maximum=86400)
    max_hold_ttl: int = _setting(3600, "Longest ttl_s a POST /holds may ask for, in seconds "
                                 "(at least --hold-ttl).", minimum=1, maximum=86400)
    max_body_bytes: int = _setting(1024, "Largest request body accepted, in bytes (else 413).",
                                   minimum=16, maximum=10 * 1024 * 1024)
    store: str = _setting("memory", "Where tickets live: memory, sqlite:///PATH, "
                          "postgresql://USER@HOST:PORT/DB, "
                          "or the lesson's broken demo store unsafe-memory.")
    pool_size: int = _setting(10, "Most connections one process keeps open to PostgreSQL "
                              "(postgresql:// stores only); keep it at least --threads.",
                              minimum=1, maximum=1000)
    allow_unsafe: bool = _setting(False, "Permit --store unsafe-memory, which oversells "
                                  "on purpose to show why the lock matters.")
    chore_ms: float = _setting(0.0, "A simulated slow chore per sale, in milliseconds, done "
                               "while the sale holds the inventory's lock (the lesson's "
                               "chore; 0 for none).", minimum=0, maximum=10_000)
    idempotency_ttl: float = _setting(86400.0, "Seconds an Idempotency-Key and its answer "
                                      "are kept before they are forgotten.",
                                      minimum=1, maximum=10 * 365 * 86400)
    shutdown_timeout: float = _setting(10.0, "Seconds to let in-flight requests finish after "
                                       "SIGTERM or SIGINT before closing.",
                                       minimum=0, maximum=3600)
    order_timeout: float = _setting(10.0, "Seconds a sale may wait for the durable store "
                                    "(SQLite, PostgreSQL) to commit it. Past that it answers "
                                    "503 store_unavailable if the store had not started on "
                                    "it (nothing sold), else 504 outcome_unknown.",
                                    minimum=0.1, maximum=3600)
    connection_limit: int = _setting(1000, "Most open client connections; past it waitress "
                                     "stops accepting until some close.",
                                     minimum=1, maximum=100_000)
    channel_timeout: int = _setting(30, "Seconds an idle connection is kept open before it is "
                                    "closed.", minimum=1, maximum=86400)
    request_timeout: float = _setting(10.0, "Seconds a request (its headers and its body) may "
                                      "take to arrive, counted from its first byte, whatever "
                                      "trickles in meanwhile; then the connection is closed "
                                      "(with a 408 once a request line was read).",
                                      minimum=0.1, maximum=3600)
    max_connections_per_client: int = _setting(
        -1, "Most connections one client address may hold at once; past it a connection "
        "is answered 429 and closed. 0 turns the limit off (behind a reverse proxy every "
        "client has the proxy's address).", minimum=0, maximum=100_000,
        shown_default="half of --connection-limit")
    admin_token: str = _setting("", "Bearer token for /admin/*; empty means the admin "
                                "endpoints do not exist. Prefer the environment variable: "
                                "a flag shows in the process list.", secret=True)
    access_log: str = _setting("plain", "One line per request on stderr: plain, json, or off.",
                               choices=("plain", "json", "off"))
    switch_interval_ms: float = _setting(1.0, "How long, in milliseconds, a thread may keep "
                                         "Python's GIL while another waits for it "
                                         "(sys.setswitchinterval; Python's own default is 5). "
                                         "Shorter cuts tail latency when threads compete.",
                                         minimum=0.05, maximum=100)
    log_level: str = _setting("info", "Least severe log level shown: debug, info, warning, "
                              "error.", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        if self.hold_ttl > self.max_hold_ttl:
            raise SettingsError(f"--hold-ttl {self.hold_ttl} is longer than --max-hold-ttl "
                                f"{self.max_hold_ttl}")

    def __repr__(self) -> str:  # never show a secret in a log or a traceback
        shown = []
        for f in _fields():
            value = getattr(self, f.name)
            shown.append(f"{f.name}={'***' if f.metadata['secret'] and value else repr(value)}")
        return f"Settings({', '.join(shown)})"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def per_client_limit(self) -> int:
        """--max-connections-per-client with its default worked out; 0 means no limit."""
        if self.max_connections_per_client < 0:  # the default: half, so no one takes all
            return max(1, self.connection_limit // 2)
        return self.max_connections_per_client


def _fields() -> Iterator[dataclasses.Field[Any]]:
    return iter(dataclasses.fields(Settings))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def _convert(f: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    kind = _KINDS[str(f.type)]
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise SettingsError(f"{source}: expected true or false, got {raw!r}")
    if kind is str:
        value = str(raw).strip()
        choices = f.metadata["choices"]
        if choices and value.lower() not in choices:
            raise SettingsError(f"{source}: expected one of {', '.join(choices)}, got {raw!r}")
        if not value and not f.metadata["secret"]:
            raise SettingsError(f"{source}: must not be empty")
        return value.lower() if choices else value
    try:
        value = kind(str(raw).strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise SettingsError(f"{source}: expected {noun}, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(f"{source}: expected a finite number, got {raw!r}")
    low, high = f.metadata["minimum"], f.metadata["maximum"]
    if low is not None and value < low:
        raise SettingsError(f"{source}: must be at least {low}, got {value}")
    if high is not None and value > high:
        raise SettingsError(f"{source}: must be at most {high}, got {value}")
    return value


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.metadata["secret"]:
        return "(unset)"
    return f.metadata["shown_default"] or repr(f.default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting; absent flags stay ``None`` so the environment shows."""
    for f in _fields():
        default = "unset" if f.metadata["secret"] else _shown_default(f)
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {default}]"
        if f.type == "bool":
            parser.add_argument(flag_name(f.name), dest=f.name, action="store_const",
                                const=True, default=None, help=help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None,
                                metavar=f.name.upper(), help=help_text)


def load(args: argparse.Namespace | Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Build the settings from parsed flags and an environment mapping."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values: dict[str, Any] = {}
    for f in _fields():
        flag_value = given.get(f.name)
        if flag_value is not None:
            values[f.name] = _convert(f, flag_value, flag_name(f.name))
        elif env_name(f.name) in environ:
            values[f.name] = _convert(f, environ[env_name(f.name)], env_name(f.name))
    return Settings(**values)


def describe() -> Sequence[tuple[str, str, str, str]]:
    """(flag, environment variable, default, help) per setting, for docs and tests."""
    return [(flag_name(f.name), env_name(f.name), _shown_default(f), f.metadata["help"])
            for f in _fields()]
