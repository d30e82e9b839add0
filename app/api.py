"""The Flask application: routes that turn JSON requests into calls on the booth."""

from __future__ import annotations

import json
import re
from datetime import datetime
from importlib import resources
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import NotFound, UnsupportedMediaType

from app.errors import BadRequest, json_response, register_error_handlers
from app.inventory import Booth, Sale, Store
from app.settings import Settings

__all__ = ["create_app", "rfc3339"]

_INTEGER = re.compile(r"-?[0-9]{1,30}")
_KEY_CHARS = re.compile(r"[\x20-\x7e]{1,255}")
_BODY_FIELDS = frozenset({"quantity"})


def rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _quantity_from_json(value: Any) -> int:
    # bool is an int in Python, but true is not a quantity.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("invalid_quantity",
                         f"quantity must be an integer, got {json.dumps(value)}")
    return value


def _quantity_from_query(text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise BadRequest("invalid_quantity", f"quantity must be an integer, got {text!r}")
    return int(text)


def _requested_quantity() -> int:
    """The quantity from the JSON body or the query string; 1 when neither gives one."""
    queried = request.args.getlist("quantity")
    if len(queried) > 1:
        raise BadRequest("invalid_quantity", "give quantity once")
    body = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    if body.strip():
        if request.mimetype != "application/json":
            raise UnsupportedMediaType("the request body must be application/json")
        try:
            document = json.loads(body)
        except ValueError:
            raise BadRequest("invalid_json", "the request body is not valid JSON") from None
        if not isinstance(document, dict):
            raise BadRequest("invalid_body", "the request body must be a JSON object")
        unknown = document.keys() - _BODY_FIELDS
        if unknown:
            raise BadRequest("invalid_body", f"unknown field(s): {', '.join(sorted(unknown))}")
        if "quantity" in document:
            if queried:
                raise BadRequest("invalid_quantity",
                                 "give quantity in the query or in the body, not both")
            return _quantity_from_json(document["quantity"])
    if queried:
        return _quantity_from_query(queried[0])
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


def create_app(settings: Settings, store: Store) -> Flask:
    """Build the WSGI app around an open store. Nothing global: tests build their own."""
    app = Flask(__name__, static_folder=None)
    status_page = resources.files("app").joinpath("static/status.html").read_bytes()
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    booth = Booth(store, settings.max_per_request)
    app.extensions["ticketbooth.booth"] = booth
    register_error_handlers(app)

    @app.post("/buy")
    def buy() -> Response:
        key = _idempotency_key()
        quantity = _requested_quantity()
        return _sale_response(booth.buy(quantity, key))

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

    @app.get("/healthz")
    def healthz() -> Response:
        store.check()
        return json_response({"status": "ok"})

    return app
