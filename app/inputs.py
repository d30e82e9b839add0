"""Reading request input: JSON bodies, quantities, idempotency keys, with clear 4xx errors.

Pure functions over plain values, so Flask's views and the hot path read input the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

from werkzeug.exceptions import UnsupportedMediaType

from app.errors import BadRequest

__all__ = ["hold_request", "idempotency_key", "integer_from_json", "integer_from_query",
           "json_object", "requested_quantity"]

_INTEGER = re.compile(r"-?[0-9]{1,30}")
_KEY_CHARS = re.compile(r"[\x20-\x7e]{1,255}")
_BUY_FIELDS = frozenset({"quantity"})
_HOLD_FIELDS = frozenset({"quantity", "ttl_s"})


def json_object(body: bytes, mimetype: str, fields: frozenset[str]) -> dict[str, Any]:
    """The JSON object in ``body`` ({} when there is none), with only ``fields``."""
    if not body.strip():
        return {}
    if mimetype != "application/json":
        raise UnsupportedMediaType("the request body must be application/json")
    try:
        document = json.loads(body)
    except ValueError:
        raise BadRequest("invalid_json", "the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise BadRequest("invalid_body", "the request body must be a JSON object")
    unknown = document.keys() - fields
    if unknown:
        raise BadRequest("invalid_body", f"unknown field(s): {', '.join(sorted(unknown))}")
    return document


def integer_from_json(name: str, value: Any, code: str) -> int:
    # bool is an int in Python, but true is not a number of tickets.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(code, f"{name} must be an integer, got {json.dumps(value)}")
    return value


def integer_from_query(name: str, text: str, code: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise BadRequest(code, f"{name} must be an integer, got {text!r}")
    return int(text)


def requested_quantity(queried: list[str], body: bytes, mimetype: str) -> int:
    """POST /buy's quantity: from the JSON body or the query string, not both; default 1."""
    if len(queried) > 1:
        raise BadRequest("invalid_quantity", "give quantity once")
    document = json_object(body, mimetype, _BUY_FIELDS)
    if "quantity" in document:
        if queried:
            raise BadRequest("invalid_quantity",
                             "give quantity in the query or in the body, not both")
        return integer_from_json("quantity", document["quantity"], "invalid_quantity")
    if queried:
        return integer_from_query("quantity", queried[0], "invalid_quantity")
    return 1


def hold_request(body: bytes, mimetype: str) -> tuple[int, int | None]:
    """POST /holds's quantity (default 1) and ttl_s (None: the server's default)."""
    document = json_object(body, mimetype, _HOLD_FIELDS)
    quantity = (integer_from_json("quantity", document["quantity"], "invalid_quantity")
                if "quantity" in document else 1)
    ttl = (integer_from_json("ttl_s", document["ttl_s"], "invalid_ttl")
           if "ttl_s" in document else None)
    return quantity, ttl


def idempotency_key(header: str | None) -> str | None:
    if header is None:
        return None
    if not _KEY_CHARS.fullmatch(header):
        raise BadRequest("invalid_idempotency_key",
                         "Idempotency-Key must be 1 to 255 printable ASCII characters")
    return header
