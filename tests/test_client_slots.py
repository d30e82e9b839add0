"""The per-client connection count (app.server.ClientSlots): exact, as a pure object."""

from __future__ import annotations

from app.server import ClientSlots


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
