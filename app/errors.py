"""The one place where domain errors and bad input become JSON error responses.

:func:`error_parts` is the table; Flask's error handler and the hot path
(:mod:`app.hotpath`) both render from it, so an error looks the same wherever it arises.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from app.inventory import (
    HoldConfirmed,
    HoldExpired,
    HoldNotFound,
    HoldReleased,
    IdempotencyKeyInFlight,
    IdempotencyKeyReuse,
    InvalidHoldTtl,
    InvalidQuantity,
    OutcomeUnknown,
    SoldOut,
    StoreUnavailable,
    TicketboothError,
)

__all__ = ["JSON", "BadRequest", "HttpError", "error_parts", "json_bytes", "json_response",
           "register_error_handlers", "rfc3339"]

log = logging.getLogger("ticketbooth")

JSON = "application/json"

Headers = list[tuple[str, str]]


class HttpError(Exception):
    """An answer the web layer gives before the domain is reached (bad input, no token)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or []


class BadRequest(HttpError):
    """Input the web layer rejects: a 400 with a code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(400, code, message)


# Domain error -> (status, error code). Checked in order, so subclasses come first.
_DOMAIN_STATUS: tuple[tuple[type[TicketboothError], int, str], ...] = (
    (SoldOut, 409, "sold_out"),
    (InvalidQuantity, 400, "invalid_quantity"),
    (InvalidHoldTtl, 400, "invalid_ttl"),
    (HoldNotFound, 404, "not_found"),
    (HoldExpired, 410, "hold_expired"),
    (HoldReleased, 409, "hold_released"),
    (HoldConfirmed, 409, "hold_confirmed"),
    (IdempotencyKeyInFlight, 409, "idempotency_key_in_flight"),
    (IdempotencyKeyReuse, 422, "idempotency_key_reuse"),
    (StoreUnavailable, 503, "store_unavailable"),
    (OutcomeUnknown, 504, "outcome_unknown"),
)

# Werkzeug's HTTP errors by status -> our error code.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes(body), status, headers, content_type=JSON)


def error_parts(error: BaseException) -> tuple[int, Headers, bytes]:
    """Status, extra headers and JSON body for any error raised while answering."""
    headers: Headers = []
    extra: dict[str, Any] = {}
    if isinstance(error, TicketboothError):
        mapped = next(((status, code) for kind, status, code in _DOMAIN_STATUS
                       if isinstance(error, kind)), None)
        if mapped is None:  # a domain error with no mapping is a bug in this table
            return _unexpected(error)
        status, code = mapped
        if isinstance(error, SoldOut):
            extra["remaining"] = error.remaining
            if error.replayed:
                headers.append(("Idempotent-Replayed", "true"))
        if isinstance(error, StoreUnavailable | OutcomeUnknown):
            headers.append(("Retry-After", "1"))
        message = str(error)
    elif isinstance(error, HttpError):
        status, code, message, headers = error.status, error.code, str(error), list(error.headers)
    elif isinstance(error, HTTPException):
        status = error.code or 500
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        code = _HTTP_CODES.get(status, error.name.lower().replace(" ", "_"))
        message = error.description or error.name
    else:
        return _unexpected(error)
    return status, headers, json_bytes({"error": code, "message": message, **extra})


def _unexpected(error: BaseException) -> tuple[int, Headers, bytes]:
    log.error("unhandled error", exc_info=error)
    return 500, [], json_bytes({"error": "internal_error",
                                "message": "the server hit an unexpected error"})


def _error_response(error: Exception) -> Response:
    status, headers, body = error_parts(error)
    return Response(body, status, headers, content_type=JSON)


def register_error_handlers(app: Flask) -> None:
    # A handler for Exception also receives Werkzeug's HTTP errors (404, 405, 413, ...).
    app.register_error_handler(Exception, _error_response)
