"""The holds API: reserve tickets, then confirm, release, or let them expire.

``POST /holds`` -> 201 with the hold and ``Location: /holds/ID``; ``GET /holds/ID``;
``POST /holds/ID/confirm`` -> the tickets, sold; ``DELETE /holds/ID`` -> 204. Every rule is
the booth's and the store's (:mod:`app.inventory`); errors render from the one table in
:mod:`app.errors`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, request

from app.errors import json_response, rfc3339
from app.hotpath import sale_document
from app.inputs import hold_request, idempotency_key
from app.inventory import Booth, Hold
from app.telemetry import Telemetry

__all__ = ["hold_body", "register_holds"]

_REPLAYED = {"Idempotent-Replayed": "true"}


def hold_body(hold: Hold) -> dict[str, Any]:
    body: dict[str, Any] = {"id": hold.id, "quantity": hold.quantity, "state": hold.state,
                            "expires_at": rfc3339(datetime.fromtimestamp(hold.expires_at, UTC))}
    if hold.state == "confirmed":
        body["tickets"] = [{"serial": serial} for serial in hold.serials]
    return body


def register_holds(app: Flask, booth: Booth, telemetry: Telemetry) -> None:
    @app.post("/holds")
    def create_hold() -> Response:
        key = idempotency_key(request.headers.get("Idempotency-Key"))
        quantity, ttl = hold_request(request.get_data(cache=False), request.mimetype)
        hold = booth.hold(quantity, ttl, key)
        headers = {"Location": f"/holds/{hold.id}"}
        if hold.replayed:
            headers.update(_REPLAYED)
        else:
            telemetry.held("created")
        return json_response(hold_body(hold), 201, headers)

    @app.get("/holds/<hold_id>")
    def get_hold(hold_id: str) -> Response:
        return json_response(hold_body(booth.get_hold(hold_id)))

    @app.post("/holds/<hold_id>/confirm")
    def confirm_hold(hold_id: str) -> Response:
        sale = booth.confirm(hold_id)
        if sale.replayed:
            return json_response(sale_document(sale), headers=_REPLAYED)
        telemetry.held("confirmed")
        telemetry.sold(len(sale.serials))
        return json_response(sale_document(sale))

    @app.delete("/holds/<hold_id>")
    def release_hold(hold_id: str) -> Response:
        released = booth.release(hold_id)
        if not released.replayed:
            telemetry.held("released")
        return Response(status=204)
