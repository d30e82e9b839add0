"""The one place where domain errors and bad input become JSON error responses."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from app.inventory import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReuse,
    InvalidQuantity,
    SoldOut,
    StoreUnavailable,
    TicketboothError,
)

__all__ = ["BadRequest", "error_response", "json_response", "register_error_handlers"]

log = logging.getLogger("ticketbooth")

JSON = "application/json"


class BadRequest(Exception):
    """Input the web layer rejects before it reaches the domain: a 400 with a code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Domain error -> (status, error code). Checked in order, so subclasses come first.
_DOMAIN_STATUS: tuple[tuple[type[TicketboothError], int, str], ...] = (
    (SoldOut, 409, "sold_out"),
    (InvalidQuantity, 400, "invalid_quantity"),
    (IdempotencyKeyInFlight, 409, "idempotency_key_in_flight"),
    (IdempotencyKeyReuse, 422, "idempotency_key_reuse"),
    (StoreUnavailable, 503, "store_unavailable"),
)

# Werkzeug's HTTP errors by status -> our error code.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status, headers, content_type=JSON)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> Response:
    return json_response({"error": code, "message": message, **extra}, status, headers)


def _domain_error(error: TicketboothError) -> Response:
    mapped = next(((status, code) for kind, status, code in _DOMAIN_STATUS
                   if isinstance(error, kind)), None)
    if mapped is None:  # a domain error with no mapping is a bug in this table
        return _unexpected(error)
    status, code = mapped
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if isinstance(error, SoldOut):
        extra["remaining"] = error.remaining
        if error.replayed:
            headers["Idempotent-Replayed"] = "true"
    if isinstance(error, StoreUnavailable):
        headers["Retry-After"] = "1"
    return error_response(status, code, str(error), headers, **extra)


def _bad_request(error: BadRequest) -> Response:
    return error_response(400, error.code, str(error))


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    code = _HTTP_CODES.get(status, error.name.lower().replace(" ", "_"))
    return error_response(status, code, error.description or error.name, headers)


def _unexpected(error: BaseException) -> Response:
    log.error("unhandled error", exc_info=error)
    return error_response(500, "internal_error", "the server hit an unexpected error")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(TicketboothError, _domain_error)
    app.register_error_handler(BadRequest, _bad_request)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
