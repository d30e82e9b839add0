"""The Flask application: routes that turn JSON requests into calls on the booth."""

from __future__ import annotations

import json
import re
from datetime import datetime
from importlib import resources

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import NotFound

from app.admin import register_admin
from app.errors import BadRequest, json_response, register_error_handlers
from app.inputs import integer_from_json, integer_from_query, json_object
from app.inventory import Booth, Sale, Store
from app.settings import Settings
from app.telemetry import Telemetry, TelemetryMiddleware

__all__ = ["create_app", "describe_openapi", "rfc3339"]

_KEY_CHARS = re.compile(r"[\x20-\x7e]{1,255}")
_BODY_FIELDS = frozenset({"quantity"})


def rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _requested_quantity() -> int:
    """The quantity from the JSON body or the query string; 1 when neither gives one."""
    queried = request.args.getlist("quantity")
    if len(queried) > 1:
        raise BadRequest("invalid_quantity", "give quantity once")
    document = json_object(_BODY_FIELDS)
    if "quantity" in document:
        if queried:
            raise BadRequest("invalid_quantity",
                             "give quantity in the query or in the body, not both")
        return integer_from_json("quantity", document["quantity"], "invalid_quantity")
    if queried:
        return integer_from_query("quantity", queried[0], "invalid_quantity")
    return 1


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _KEY_CHARS.fullmatch(key):
        raise BadRequest("invalid_idempotency_key",
                         "Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key


def _sale_response(sale: Sale) -> Response:
    body = {"tickets": [{"serial": serial} for serial in sale.serials],
            "remaining": sale.remaining}
    return json_response(body, headers={"Idempotent-Replayed": "true"} if sale.replayed else None)


def describe_openapi(openapi: str, settings: Settings) -> bytes:
    """The packaged OpenAPI description, with this server's quantity cap filled in."""
    document = json.loads(openapi)
    buy = document["paths"]["/buy"]["post"]
    for schema in (buy["parameters"][0]["schema"],
                   document["components"]["schemas"]["BuyRequest"]["properties"]["quantity"]):
        schema["maximum"] = settings.max_per_request
    return json.dumps(document).encode()


def create_app(settings: Settings, store: Store) -> Flask:
    """Build the WSGI app around an open store. Nothing global: tests build their own."""
    app = Flask(__name__, static_folder=None)
    package = resources.files("app")
    status_page = package.joinpath("static/status.html").read_bytes()
    openapi = describe_openapi(package.joinpath("openapi.json").read_text(), settings)
    telemetry = Telemetry(store, settings.access_log)
    app.extensions["ticketbooth.telemetry"] = telemetry
    app.wsgi_app = TelemetryMiddleware(app.wsgi_app, telemetry)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    booth = Booth(store, settings.max_per_request)
    app.extensions["ticketbooth.booth"] = booth
    register_error_handlers(app)

    @app.post("/buy")
    def buy() -> Response:
        key = _idempotency_key()
        quantity = _requested_quantity()
        sale = booth.buy(quantity, key)
        if not sale.replayed:
            telemetry.sold(len(sale.serials))
        return _sale_response(sale)

    @app.get("/remaining")
    def remaining() -> Response:
        counts = store.counts()
        return json_response({"remaining": counts.remaining, "sold": counts.sold,
                              "total": counts.total})

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

    register_admin(app, settings.admin_token, store, telemetry)

    @app.get("/healthz")
    def healthz() -> Response:
        store.check()
        return json_response({"status": "ok"})

    return app
