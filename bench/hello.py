"""The bench's two ceilings: a bare WSGI hello and a Flask hello, served like the service.

``python -m bench.hello wsgi|flask [--port 0]`` serves one of them and prints
``hello listening on http://127.0.0.1:PORT``. Both are served by the service's own
:class:`app.server.Server` with default :class:`app.settings.Settings`, so waitress runs
with exactly the service's settings (4 threads, connection limit, channel timeout, body
limit, the same event loop) and cannot drift from them. This is the one bench module that
imports ``app``; it runs only in its own subprocess.

Both answer any method on any path with ``Hello, World!`` (text/plain, 13 bytes), so the
bench can send them the very request it sends the service (``POST /buy``).

A third, ``booth``, is the least that ``ticketbooth-load`` accepts as a service: bare WSGI,
a counter under a lock, ``POST /buy`` answered with a serial, ``GET /remaining`` with the
counts. The bench runs the open-loop generator against it at the same rate as against the
service: the p99 it gets there is the generator's (and waitress's) own floor.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["BoothApp", "flask_hello", "main", "run", "wsgi_hello"]

HELLO = b"Hello, World!"


def wsgi_hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The least a WSGI app can do: the ceiling of waitress and Python here."""
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(HELLO)))])
    return [HELLO]


def flask_hello() -> Callable[..., Iterable[bytes]]:
    """The classic Flask hello (routing, request and response objects): the framework's
    ceiling."""
    from flask import Flask

    app = Flask(__name__, static_folder=None)

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
    @app.route("/<path:path>", methods=["GET", "POST"])
    def hello(path: str) -> str:
        return "Hello, World!"

    return app


class BoothApp:
    """A ticket booth with nothing but a counter: the generator's floor, not a service."""

    TOTAL = 10**12

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sold = 0

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/buy":
            with self._lock:
                self._sold += 1
                sold = self._sold
            body = b'{"tickets":[{"serial":%d}],"remaining":%d}' % (sold, self.TOTAL - sold)
        elif path == "/remaining":
            with self._lock:
                sold = self._sold
            body = b'{"remaining":%d,"sold":%d,"total":%d}' % (self.TOTAL - sold, sold,
                                                               self.TOTAL)
        else:
            body = b'{"status":"ok"}'
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hello",
        description="Serve a hello app with the service's own waitress settings (for the "
                    "bench). Prints 'hello listening on URL' once listening; SIGTERM stops it.")
    parser.add_argument("kind", choices=("wsgi", "flask", "booth"),
                        help="wsgi: a bare WSGI callable; flask: a Flask app; booth: a bare "
                             "WSGI counter that answers /buy and /remaining like the service")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port on 127.0.0.1 (default 0: a free port)")
    args = parser.parse_args(argv)

    from app.server import Server
    from app.settings import Settings

    # As `ticketbooth serve` does: waitress's queue-depth warnings are normal under load.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    apps: dict[str, Callable[[], Callable[..., Iterable[bytes]]]] = {
        "wsgi": lambda: wsgi_hello, "flask": flask_hello, "booth": BoothApp}
    app = apps[args.kind]()
    server = Server(Settings(host="127.0.0.1", port=args.port), app)
    server.install_signal_handlers()
    print(f"hello listening on {server.url}", flush=True)
    server.serve()
    return 0


def main() -> int:
    return run(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
