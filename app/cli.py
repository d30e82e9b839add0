"""``ticketbooth serve``: flags and environment -> settings -> store -> app -> server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from app import settings as settings_module
from app.api import create_app
from app.server import Server
from app.settings import Settings, SettingsError
from app.stores import StoreSetupError, open_store

__all__ = ["main", "run"]

log = logging.getLogger("ticketbooth")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and no exit from deep inside."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SettingsError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ticketbooth",
                     description="An HTTP ticket booth that never sells a ticket twice.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = commands.add_parser("serve", help="Serve the booth over HTTP with waitress.",
                                description="Serve the booth over HTTP. Every flag can also "
                                "be set with its TICKETBOOTH_* environment variable; flags win.")
    settings_module.add_arguments(serve)
    return parser


def _serve(settings: Settings) -> int:
    if settings.store == "unsafe-memory" and settings.allow_unsafe:
        log.warning("UNSAFE STORE: --store unsafe-memory sells without a lock and WILL "
                    "oversell and hand out duplicate tickets. For demonstrations only.")
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    store = open_store(settings)
    try:
        server = Server(settings, create_app(settings, store))
        server.install_signal_handlers()
        # One line per address; the first keeps its format, for scripts that read it.
        for url in server.urls:
            print(f"ticketbooth listening on {url}", flush=True)
        server.serve()
    finally:
        store.close()
    log.info("ticketbooth stopped")
    return 0


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # waitress warns on every queued request under load; that is normal here, not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def run(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad setting)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        settings = settings_module.load(args, os.environ if environ is None else environ)
        _configure_logging(settings.log_level)
        return _serve(settings)
    except (SettingsError, StoreSetupError) as error:
        print(f"ticketbooth: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. the port is taken
        print(f"ticketbooth: error: {error.strerror or error}", file=sys.stderr)
        return 2


def main() -> None:
    sys.exit(run())
