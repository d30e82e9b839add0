"""The hot endpoints, ``/buy`` and ``/remaining``, served without Flask's per-request work.

Selling is what the booth does all day, and Flask's request machinery (contexts, URL
matching, signals, response objects) costs more than the sale itself. So these two paths
are answered by a small WSGI layer in front of the Flask app, which serves everything else.
They read input with the same functions (:mod:`app.inputs`), call the same domain
(:class:`~app.inventory.Booth`), and render errors from the same table
(:func:`app.errors.error_parts`) as the Flask views; every method on these paths is
answered here (405 with ``Allow`` for the wrong one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any, BinaryIO
from urllib.parse import parse_qs

from werkzeug.exceptions import MethodNotAllowed, RequestEntityTooLarge

from app.errors import JSON, BadRequest, Headers, error_parts, json_bytes
from app.inputs import idempotency_key, requested_quantity
from app.inventory import Booth, Sale, Store, TicketboothError
from app.parking import ENVIRON_KEY, Parking
from app.telemetry import Telemetry

__all__ = ["ROUTES", "HotPath", "sale_document"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# path -> methods served (OPTIONS is answered too); the OpenAPI route test reads this.
ROUTES: dict[str, tuple[str, ...]] = {"/buy": ("POST",), "/remaining": ("GET", "HEAD")}

_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}
_REPLAYED: Headers = [("Idempotent-Replayed", "true")]


def sale_document(sale: Sale) -> dict[str, Any]:
    """What a sale answers (POST /buy, and a hold's confirm)."""
    return {"tickets": [{"serial": serial} for serial in sale.serials],
            "remaining": sale.remaining}


class HotPath:
    def __init__(self, app: WSGIApp, booth: Booth, store: Store, telemetry: Telemetry,
                 max_body_bytes: int) -> None:
        self.app = app
        self.booth = booth
        self.store = store
        self.telemetry = telemetry
        self.max_body_bytes = max_body_bytes
        self._handlers: dict[str, Callable[[dict[str, Any]], tuple[int, Headers, bytes]]] = {
            "/buy": self._buy, "/remaining": self._remaining}

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        handler = self._handlers.get(path)
        if handler is None:
            return self.app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        allowed = ROUTES[path]
        try:
            if method in allowed:
                status, headers, body = handler(environ)
            elif method == "OPTIONS":
                status, headers, body = 200, [("Allow", ", ".join((*allowed, "OPTIONS")))], b""
            else:
                raise MethodNotAllowed(valid_methods=[*allowed, "OPTIONS"])
        except Exception as error:
            status, headers, body = error_parts(error)
        headers.append(("Content-Type", JSON))
        headers.append(("Content-Length", str(len(body))))
        start_response(_STATUS_LINES[status], headers)
        return [b"" if method == "HEAD" else body]

    def park(self, method: str, path: str, query: str, headers: Mapping[str, str],
             body: BinaryIO, parking: Callable[[], Parking]) -> bool:
        """Hand a ``POST /buy`` to the store without waiting (see app.parking).

        Called by the server (on its event loop, so it never blocks) before any WSGI work,
        with the request line's parts, the headers as waitress keeps them (``CONTENT_TYPE``,
        ``IDEMPOTENCY_KEY``) and the body, and ``parking``, which makes the request's
        :class:`Parking` (called only once the request is to be parked). True when the order
        is handed over: the request is to run again once its parking has the outcome. False
        for any other request, and for one with bad input, a key still in flight or a store
        that cannot take it now; it then runs as usual and gets its answer there.
        """
        if path != "/buy" or method != "POST":
            return False
        try:
            quantity, key = self._order(query, headers.get("CONTENT_TYPE", ""),
                                        headers.get("CONTENT_LENGTH"), body,
                                        headers.get("IDEMPOTENCY_KEY"))
        except Exception:
            return False
        finally:
            body.seek(0)  # a request left unparked reads its body again when it runs
        try:
            self.booth.buy_later(quantity, key, parking().done)
        except TicketboothError:  # a bad quantity, a key in flight, a closed store
            return False
        return True

    def _buy(self, environ: dict[str, Any]) -> tuple[int, Headers, bytes]:
        parking: Parking | None = environ.get(ENVIRON_KEY)
        if parking is not None:  # read when it was parked; sold since
            sale = parking.result()
        else:
            quantity, key = self._order(environ.get("QUERY_STRING", ""),
                                        environ.get("CONTENT_TYPE", ""),
                                        environ.get("CONTENT_LENGTH"), environ["wsgi.input"],
                                        environ.get("HTTP_IDEMPOTENCY_KEY"))
            sale = self.booth.buy(quantity, key)
        if sale.replayed:
            return 200, list(_REPLAYED), json_bytes(sale_document(sale))
        self.telemetry.sold(len(sale.serials))
        return 200, [], json_bytes(sale_document(sale))

    def _order(self, query: str, content_type: str, content_length: str | None,
               body: BinaryIO, key_header: str | None) -> tuple[int, str | None]:
        """A buy's quantity and Idempotency-Key, read the same way wherever it is read."""
        key = idempotency_key(key_header)
        queried = parse_qs(query, keep_blank_values=True).get("quantity", []) if query else []
        mimetype = content_type.split(";")[0].strip().lower()
        return requested_quantity(queried, self._body(content_length, body), mimetype), key

    def _remaining(self, environ: dict[str, Any]) -> tuple[int, Headers, bytes]:
        counts = self.store.counts()
        return 200, [], json_bytes({"remaining": counts.remaining, "sold": counts.sold,
                                    "held": counts.held, "total": counts.total})

    def _body(self, content_length: str | None, body: BinaryIO) -> bytes:
        text = content_length or "0"
        if not text.isdigit():
            raise BadRequest("bad_request", "Content-Length must be a number of bytes")
        length = int(text)
        if length > self.max_body_bytes:
            raise RequestEntityTooLarge(
                f"the request body is over the limit of {self.max_body_bytes} bytes")
        return body.read(length) if length else b""
