"""What app/server.py takes from waitress beyond its public API, and the per-client count."""

from __future__ import annotations

import pytest
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer

from app.server import ClientSlots


@pytest.mark.parametrize(("owner", "names"), [
    (HTTPChannel, ["request", "requests", "requests_lock", "will_close", "close_when_flushed",
                   "total_outbufs_len", "received", "write_soon", "del_channel",
                   "handle_close", "service", "writable"]),
    (HTTPRequestParser, ["header_plus", "body_rcv", "close", "error"]),
    (BaseWSGIServer, ["channel_class", "add_task", "effective_host", "trigger",
                      "task_dispatcher"]),
])
def test_the_waitress_names_the_server_uses_are_there(owner: type, names: list[str]) -> None:
    # Instance attributes set in __init__ are looked for in its code.
    code = owner.__init__.__code__.co_names
    missing = [name for name in names if not hasattr(owner, name) and name not in code]
    assert not missing, f"waitress changed: {owner.__name__} has no {missing}"


def test_client_slots_serve_then_refuse_a_few_then_drop() -> None:
    slots = ClientSlots(2)
    taken = [slots.take("a") for _ in range(12)]
    assert taken == ["serve"] * 2 + ["refuse"] * 8 + ["drop"] * 2
    assert slots.take("b") == "serve"  # another address has its own
    slots.give_back("a", "serve")
    slots.give_back("a", "drop")  # a dropped connection held nothing
    assert slots.take("a") == "serve"
    assert slots.take("a") == "drop"  # the refusals are still out
    for _ in range(8):
        slots.give_back("a", "refuse")
    assert slots.take("a") == "refuse"


def test_client_slots_without_a_limit_serve_everyone() -> None:
    slots = ClientSlots(0)
    assert {slots.take("a") for _ in range(1_000)} == {"serve"}
