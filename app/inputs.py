"""Reading request input: JSON bodies and integers, with clear 4xx errors."""

from __future__ import annotations

import json
import re
from typing import Any

from flask import request
from werkzeug.exceptions import UnsupportedMediaType

from app.errors import BadRequest

__all__ = ["integer_from_json", "integer_from_query", "json_object"]

_INTEGER = re.compile(r"-?[0-9]{1,30}")


def json_object(fields: frozenset[str]) -> dict[str, Any]:
    """The request's JSON object body ({} when there is none), with only ``fields``."""
    body = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    if not body.strip():
        return {}
    if request.mimetype != "application/json":
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
