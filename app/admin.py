"""The operator's endpoints, behind a bearer token: restock and sales figures.

With no token configured they do not exist at all (404), so a forgotten setting can never
leave them open.
"""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request

from app.errors import BadRequest, HttpError, json_response
from app.inputs import integer_from_json, json_object
from app.inventory import Store
from app.telemetry import Telemetry

__all__ = ["MAX_RESTOCK", "register_admin"]

MAX_RESTOCK = 10**9
_REALM = 'Bearer realm="ticketbooth"'


def _unauthorized(message: str, challenge: str) -> HttpError:
    return HttpError(401, "unauthorized", message, [("WWW-Authenticate", challenge)])


def register_admin(app: Flask, token: str, store: Store, telemetry: Telemetry) -> None:
    if not token:
        return
    expected = token.encode()

    def require_token(view: Callable[[], Response]) -> Callable[[], Response]:
        @functools.wraps(view)
        def guarded() -> Response:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                raise _unauthorized("this endpoint needs an Authorization: Bearer token",
                                    _REALM)
            if not hmac.compare_digest(given.strip().encode(), expected):
                raise _unauthorized("the bearer token is not valid",
                                    f'{_REALM}, error="invalid_token"')
            return view()

        return guarded

    @app.post("/admin/restock")
    @require_token
    def restock() -> Response:
        document = json_object(request.get_data(cache=False), request.mimetype,
                               frozenset({"tickets"}))
        if "tickets" not in document:
            raise BadRequest("invalid_tickets", 'give {"tickets": n} in a JSON body')
        tickets = integer_from_json("tickets", document["tickets"], "invalid_tickets")
        if not 1 <= tickets <= MAX_RESTOCK:
            raise BadRequest("invalid_tickets",
                             f"tickets must be between 1 and {MAX_RESTOCK}, got {tickets}")
        counts = store.restock(tickets)
        return json_response({"added": tickets, "total": counts.total, "sold": counts.sold,
                              "held": counts.held, "remaining": counts.remaining})

    @app.get("/admin/stats")
    @require_token
    def stats() -> Response:
        counts = store.counts()
        figures: dict[str, Any] = {
            "total": counts.total,
            "sold": counts.sold,
            "remaining": counts.remaining,
            "held": counts.held,
            "holds_by_this_instance": telemetry.hold_outcomes(),
            "sold_by_this_instance": telemetry.total("ticketbooth_tickets_sold_total"),
            "sold_last_minute": telemetry.sales_rate.last_minute(),
            "idempotent_replays": telemetry.total("ticketbooth_idempotent_replays_total"),
            "uptime_s": round(time.time() - telemetry.started_at, 3),
        }
        return json_response(figures)
