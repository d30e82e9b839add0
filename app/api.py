"""The Flask application: routes that turn JSON requests into calls on the booth."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources

from flask import Flask, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import NotFound

from app.admin import register_admin
from app.errors import json_response, register_error_handlers, rfc3339
from app.holds import register_holds
from app.hotpath import HotPath
from app.inventory import Booth, Store
from app.parking import PARK_EXTENSION, WITHDRAW_EXTENSION
from app.settings import Settings
from app.telemetry import Telemetry, TelemetryMiddleware

__all__ = ["create_app", "describe_openapi"]


def describe_openapi(openapi: str, settings: Settings) -> bytes:
    """The packaged OpenAPI description, with this server's quantity cap filled in."""
    document = json.loads(openapi)
    buy = document["paths"]["/buy"]["post"]
    schemas = document["components"]["schemas"]
    for schema in (buy["parameters"][0]["schema"],
                   schemas["BuyRequest"]["properties"]["quantity"],
                   schemas["HoldRequest"]["properties"]["quantity"]):
        schema["maximum"] = settings.max_per_request
    schemas["HoldRequest"]["properties"]["ttl_s"]["maximum"] = settings.max_hold_ttl
    return json.dumps(document).encode()


def create_app(settings: Settings, store: Store,
               clock: Callable[[], float] = time.time) -> Flask:
    """Build the WSGI app around an open store. Nothing global: tests build their own
    (with a clock of their own for the sales figures, if they like)."""
    app = Flask(__name__, static_folder=None)
    package = resources.files("app")
    status_page = package.joinpath("static/status.html").read_bytes()
    openapi = describe_openapi(package.joinpath("openapi.json").read_text(), settings)
    telemetry = Telemetry(store, settings.access_log, settings.log_level, clock)
    booth = Booth(store, settings.max_per_request, hold_ttl=settings.hold_ttl,
                  max_hold_ttl=settings.max_hold_ttl)
    # Outermost first: telemetry times everything; the hot path answers /buy and /remaining;
    # Flask answers the rest.
    hot = HotPath(app.wsgi_app, booth, store, telemetry, settings.max_body_bytes)
    app.wsgi_app = TelemetryMiddleware(hot, telemetry)  # type: ignore[method-assign]
    if booth.can_defer:
        app.extensions[PARK_EXTENSION] = hot.park
        app.extensions[WITHDRAW_EXTENSION] = booth.withdraw_pending
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    register_error_handlers(app)

    @app.get("/tickets/<int:serial>")
    def ticket(serial: int) -> Response:
        sold_at = store.sold_at(serial)
        if sold_at is None:
            raise NotFound(f"ticket {serial} is not sold")
        return json_response({"serial": serial, "sold_at": rfc3339(sold_at)})

    @app.get("/")
    def index() -> Response:
        return Response(status_page, content_type="text/html; charset=utf-8")

    @app.get("/openapi.json")
    def openapi_description() -> Response:
        return Response(openapi, content_type="application/json")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(telemetry.registry), content_type=CONTENT_TYPE_LATEST)

    register_holds(app, booth, telemetry)
    register_admin(app, settings.admin_token, store, telemetry)

    @app.get("/healthz")
    def healthz() -> Response:
        store.check()
        return json_response({"status": "ok"})

    return app
