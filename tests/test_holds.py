"""The store contract for holds: every backend passes this same suite.

Expiry is judged by the store's clock: an injected clock on memory and SQLite, the
database's ``now()`` on PostgreSQL, where the tests use short real TTLs and poll.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg
import pytest

from app.inventory import (
    Hold,
    HoldConfirmed,
    HoldExpired,
    HoldNotFound,
    HoldReleased,
    IdempotencyKeyReuse,
    LiveHolds,
    SoldOut,
    Store,
    new_hold_id,
)
from tests.conftest import FakeClock, Stores, poll, run_threads

# A real TTL short enough for PostgreSQL's tests to wait out.
SHORT_TTL = 0.3


class Scene:
    """A store with a clock the test controls (PostgreSQL's is real: it is waited out)."""

    def __init__(self, make_store: Stores, tickets: int) -> None:
        self.kind = make_store.kind
        self.clock = FakeClock()
        self.store: Store = make_store(tickets, clock=self.clock)

    def hold(self, quantity: int, key: str | None = None) -> Hold:
        return self.store.hold(quantity, SHORT_TTL if self.kind == "postgres" else 60, key)

    def expire(self, hold: Hold) -> None:
        """Let ``hold``'s time run out."""
        if self.kind == "postgres":
            poll(lambda: self.store.get_hold(hold.id).state == "expired",  # type: ignore[union-attr]
                 "the hold to expire", 15)
        else:
            self.clock.advance(60)


def put_in_state(scene: Scene, state: str) -> str:
    """A hold of 2 tickets in ``state`` (or an unknown id); returns its id."""
    if state == "unknown":
        return new_hold_id()
    hold = scene.hold(2)
    if state == "confirmed":
        scene.store.confirm(hold.id)
    elif state == "released":
        scene.store.release(hold.id)
    elif state == "expired":
        scene.expire(hold)
    return hold.id


# (state, action, expected answer, sold and held afterwards). The expected answer is an
# error class, "sold [serials]", "replay [serials]", or the hold's state.
STATE_MACHINE = [
    ("held", "confirm", "sold 1 2", 2, 0),
    ("held", "release", "released", 0, 0),
    ("held", "get", "held", 0, 2),
    ("confirmed", "confirm", "replay 1 2", 2, 0),
    ("confirmed", "release", HoldConfirmed, 2, 0),
    ("confirmed", "get", "confirmed", 2, 0),
    ("released", "confirm", HoldReleased, 0, 0),
    ("released", "release", "released", 0, 0),
    ("released", "get", "released", 0, 0),
    ("expired", "confirm", HoldExpired, 0, 0),
    ("expired", "release", "expired", 0, 0),
    ("expired", "get", "expired", 0, 0),
    ("unknown", "confirm", HoldNotFound, 0, 0),
    ("unknown", "release", HoldNotFound, 0, 0),
    ("unknown", "get", None, 0, 0),
]


@pytest.mark.parametrize(("state", "action", "expected", "sold", "held"), STATE_MACHINE,
                         ids=[f"{row[0]}-{row[1]}" for row in STATE_MACHINE])
def test_every_action_from_every_state(make_store: Stores, state: str, action: str,
                                       expected: object, sold: int, held: int) -> None:
    scene = Scene(make_store, 10)
    hold_id = put_in_state(scene, state)
    store = scene.store
    if isinstance(expected, type):
        with pytest.raises(expected):
            store.confirm(hold_id) if action == "confirm" else store.release(hold_id)
    elif action == "get":
        answer = store.get_hold(hold_id)
        assert (answer.state if answer else None) == expected
        if answer is not None:
            assert answer.id == hold_id and answer.quantity == 2
            assert list(answer.serials) == ([1, 2] if expected == "confirmed" else [])
    elif action == "confirm":
        sale = store.confirm(hold_id)
        verb, *serials = str(expected).split()
        assert list(sale.serials) == [int(serial) for serial in serials]
        assert sale.replayed == (verb == "replay")
        assert sale.remaining == 10 - sold - held
    else:
        released = store.release(hold_id)
        assert (released.id, released.state) == (hold_id, expected)
        assert released.replayed == (state != "held")
    counts = store.counts()
    assert (counts.sold, counts.held, counts.remaining) == (sold, held, 10 - sold - held)


def test_holds_count_against_the_stock_and_serials_have_no_gaps(make_store: Stores) -> None:
    scene = Scene(make_store, 6)
    store = scene.store
    first = store.hold(3, 600)
    assert (first.quantity, first.state, first.replayed) == (3, "held", False)
    assert store.counts().remaining == 3
    with pytest.raises(SoldOut) as refused:
        store.sell(4)
    assert refused.value.remaining == 3
    with pytest.raises(SoldOut):
        store.hold(4, 600)
    second = store.hold(2, 600)
    assert list(store.sell(1).serials) == [1]
    with pytest.raises(SoldOut):
        store.sell(1)
    store.release(first.id)  # back to the stock: 3 remain
    assert list(store.confirm(second.id).serials) == [2, 3]
    assert list(store.sell(3).serials) == [4, 5, 6]
    counts = store.counts()
    assert (counts.total, counts.sold, counts.held, counts.remaining) == (6, 6, 0, 0)
    assert store.sold_at(3) is not None and store.sold_at(7) is None


def test_a_restock_adds_to_what_holds_leave(make_store: Stores) -> None:
    store = make_store(2)
    store.hold(2, 600)
    counts = store.restock(3)
    assert (counts.total, counts.held, counts.remaining) == (5, 2, 3)


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_expiry_by_the_injected_clock(make_store: Stores) -> None:
    clock = FakeClock()
    store = make_store(10, clock=clock)
    hold = store.hold(3, 100)
    assert hold.expires_at == clock.now + 100
    clock.advance(99.999)
    assert store.counts().held == 3
    assert store.get_hold(hold.id).state == "held"  # type: ignore[union-attr]
    clock.advance(0.001)  # the expiry instant: nothing else needs to happen
    assert store.counts().held == 0 and store.counts().remaining == 10
    assert store.get_hold(hold.id).state == "expired"  # type: ignore[union-attr]
    with pytest.raises(HoldExpired):
        store.confirm(hold.id)
    assert store.release(hold.id).state == "expired"
    # Cleaned up once, in the background.
    poll(lambda: store.holds_expired() == 1, "the hold to be cleaned up", 15)
    assert list(store.sell(10).serials) == list(range(1, 11))
    assert store.holds_expired() == 1


@pytest.mark.parametrize("store_kind", ["postgres"])
def test_expiry_by_the_database_clock(make_store: Stores) -> None:
    store = make_store(10)
    hold = store.hold(3, SHORT_TTL)
    live = store.hold(2, 600)
    poll(lambda: store.get_hold(hold.id).state == "expired",  # type: ignore[union-attr]
         "the hold to expire", 15)
    assert store.counts().held == 2  # at once, cleaned up or not
    with pytest.raises(HoldExpired):
        store.confirm(hold.id)
    assert list(store.sell(8).serials) == list(range(1, 9))
    poll(lambda: store.holds_expired() == 1, "the hold to be cleaned up", 15)
    assert list(store.confirm(live.id).serials) == [9, 10]
    counts = store.counts()
    assert (counts.sold, counts.held, counts.remaining) == (10, 0, 0)


def test_keys_are_one_namespace_across_buys_and_holds(make_store: Stores) -> None:
    store = make_store(10)
    store.sell(1, "bought")
    with pytest.raises(IdempotencyKeyReuse):
        store.hold(1, 600, "bought")
    hold = store.hold(2, 600, "held")
    with pytest.raises(IdempotencyKeyReuse):
        store.sell(2, "held")
    with pytest.raises(IdempotencyKeyReuse):
        store.hold(3, 600, "held")
    again = store.hold(2, 600, "held")
    assert (again.id, again.expires_at, again.replayed) == (hold.id, hold.expires_at, True)
    with pytest.raises(SoldOut):
        store.hold(20, 600, "too-many")
    with pytest.raises(SoldOut) as replayed:
        store.hold(20, 600, "too-many")
    assert replayed.value.replayed
    counts = store.counts()
    assert (counts.sold, counts.held) == (1, 2)


def test_live_holds_count_exactly_at_any_instant() -> None:
    live = LiveHolds()
    live.add("a", 2, 10.0)
    live.add("b", 3, 5.0)
    live.add("c", 1, 20.0)
    assert [live.held(t) for t in (4.9, 5.0, 9.9, 10.0, 20.0)] == [6, 3, 3, 1, 0]
    assert live.due(10.0, 5) == ["b", "a"] and live.due(10.0, 1) == ["b"]
    live.remove("a")
    live.remove("a")  # gone already: nothing changes
    assert live.held(0.0) == 4 and len(live) == 2 and "a" not in live


@dataclass
class Record:
    """What the racing threads were told."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    serials: list[int] = field(default_factory=list)
    holds: dict[str, int] = field(default_factory=dict)  # id -> quantity
    # id -> outcomes of confirm and release: "confirmed", "released", "replay", errors
    told: dict[str, list[str]] = field(default_factory=dict)


def race(store: Store, threads: int, rounds: int) -> Record:
    record = Record()

    def buyer(index: int) -> None:
        rng = random.Random(index)
        for _ in range(rounds):
            choice = rng.random()
            quantity = rng.randint(1, 3)
            try:
                if choice < 0.3:
                    sale = store.sell(quantity)
                    with record.lock:
                        record.serials.extend(sale.serials)
                elif choice < 0.6:
                    hold = store.hold(quantity, 3600)
                    with record.lock:
                        record.holds[hold.id] = quantity
                        record.told[hold.id] = []
                else:
                    with record.lock:
                        if not record.holds:
                            continue
                        hold_id = rng.choice(list(record.holds))
                    settle(store, record, hold_id, "confirm" if choice < 0.85 else "release")
            except SoldOut:
                pass

    run_threads(buyer, threads)
    return record


def settle(store: Store, record: Record, hold_id: str, action: str) -> None:
    outcome: str
    serials: range = range(0)
    try:
        if action == "confirm":
            sale = store.confirm(hold_id)
            serials = sale.serials
            outcome = "replay" if sale.replayed else "confirmed"
        else:
            released = store.release(hold_id)
            outcome = "again" if released.replayed else released.state
    except (HoldConfirmed, HoldReleased) as refused:
        outcome = type(refused).__name__
    with record.lock:
        if outcome == "confirmed":
            record.serials.extend(serials)
        record.told[hold_id].append(outcome if outcome != "replay"
                                    else f"replay {serials.start}")
        if outcome == "confirmed":
            record.told[hold_id].append(f"first {serials.start}")


def test_racing_holds_confirms_releases_and_buys(make_store: Stores) -> None:
    store = make_store(400)
    record = race(store, threads=64, rounds=12)
    # Every serial handed out once, 1..sold without a gap, as the store counts them.
    counts = store.counts()
    assert sorted(record.serials) == list(range(1, counts.sold + 1))
    still_held = 0
    for hold_id, quantity in record.holds.items():
        told = record.told[hold_id]
        changes = Counter(outcome for outcome in told if outcome in ("confirmed", "released"))
        assert sum(changes.values()) <= 1, (hold_id, told)  # one outcome, exactly once
        hold = store.get_hold(hold_id)
        assert hold is not None and hold.quantity == quantity
        if changes["confirmed"]:
            first = next(int(o.split()[1]) for o in told if o.startswith("first"))
            assert hold.state == "confirmed" and hold.serials.start == first
            assert "HoldReleased" not in told
            assert all(int(o.split()[1]) == first for o in told if o.startswith("replay"))
        elif changes["released"]:
            assert hold.state == "released"
            assert "HoldConfirmed" not in told and not any(o.startswith("replay")
                                                           for o in told)
        else:
            assert hold.state == "held" and not told
            still_held += quantity
    assert (counts.held, counts.remaining) == (still_held, 400 - counts.sold - still_held)
    assert counts.sold > 0 and counts.held > 0


def test_a_confirm_and_a_release_at_once_have_one_outcome(make_store: Stores) -> None:
    store = make_store(100)
    holds = [store.hold(1, 3600).id for _ in range(20)]
    record = Record(holds=dict.fromkeys(holds, 1), told={hold_id: [] for hold_id in holds})
    barrier = threading.Barrier(2)

    def racer(index: int) -> None:
        barrier.wait()
        for hold_id in holds:
            settle(store, record, hold_id, "confirm" if index == 0 else "release")

    run_threads(racer, 2)
    for hold_id in holds:
        told = record.told[hold_id]
        assert Counter(o for o in told if o in ("confirmed", "released")).total() == 1, told
    counts = store.counts()
    assert counts.held == 0
    assert counts.sold == sum("confirmed" in record.told[hold_id] for hold_id in holds)
    assert sorted(record.serials) == list(range(1, counts.sold + 1))


@pytest.mark.parametrize("store_kind", ["postgres"])
def test_two_instances_hold_on_one_and_confirm_on_the_other(make_store: Stores) -> None:
    one = make_store(10)
    skewed = FakeClock(time.time() + 3600)  # an hour ahead: expiry is the database's
    other = make_store(10, clock=skewed)
    hold = one.hold(3, 600)
    assert other.get_hold(hold.id) == hold
    held_elsewhere = other.hold(2, 600)
    assert one.counts() == other.counts()
    assert (one.counts().held, one.counts().remaining) == (5, 5)
    sale = other.confirm(hold.id)
    assert list(sale.serials) == [1, 2, 3] and not sale.replayed
    assert list(one.confirm(hold.id).serials) == [1, 2, 3]  # a replay, on the first
    assert one.get_hold(hold.id).state == "confirmed"  # type: ignore[union-attr]
    assert list(one.confirm(held_elsewhere.id).serials) == [4, 5]
    counts = other.counts()
    assert (counts.sold, counts.held, counts.remaining) == (5, 0, 5)


@pytest.mark.parametrize("store_kind", ["postgres"])
def test_two_instances_confirm_and_release_at_once(make_store: Stores) -> None:
    stores = [make_store(100), make_store(100)]
    holds = [stores[i % 2].hold(1, 3600).id for i in range(30)]
    record = Record(holds=dict.fromkeys(holds, 1), told={hold_id: [] for hold_id in holds})
    barrier = threading.Barrier(2)

    def racer(index: int) -> None:
        barrier.wait()
        for hold_id in holds:
            settle(stores[index], record, hold_id, "confirm" if index == 0 else "release")

    run_threads(racer, 2)
    for hold_id in holds:
        told = record.told[hold_id]
        assert Counter(o for o in told if o in ("confirmed", "released")).total() == 1, told
        state = stores[1].get_hold(hold_id).state  # type: ignore[union-attr]
        assert state == ("confirmed" if "confirmed" in told else "released")
    confirmed = sum("confirmed" in record.told[hold_id] for hold_id in holds)
    for store in stores:
        counts = store.counts()
        assert (counts.sold, counts.held) == (confirmed, 0)
    assert sorted(record.serials) == list(range(1, confirmed + 1))


@pytest.mark.parametrize("store_kind", ["postgres"])
def test_each_expiry_is_cleaned_up_once_across_instances(make_store: Stores) -> None:
    stores = [make_store(100), make_store(100)]
    holds = [stores[i % 2].hold(2, SHORT_TTL) for i in range(20)]
    poll(lambda: sum(store.holds_expired() for store in stores) >= len(holds),
         "the holds to be cleaned up", 15)
    with psycopg.connect(make_store.url) as conn:  # nothing is left to count again
        row = conn.execute("SELECT count(*) FROM holds WHERE state = 'held'").fetchone()
        assert row is not None and row[0] == 0
    assert sum(store.holds_expired() for store in stores) == len(holds)
    assert all(stores[0].get_hold(hold.id).state == "expired"  # type: ignore[union-attr]
               for hold in holds)
    counts = stores[1].counts()
    assert (counts.held, counts.remaining) == (0, 100)


def test_confirms_racing_expiry_have_one_outcome_each(make_store: Stores) -> None:
    """Holds of a 1 s real TTL, confirmed by 8 threads over half a second around their
    expiry while the store cleans expired holds up: each is either sold or expired, never
    both, and the counts agree with the answers."""
    store = make_store(200)
    made = [store.hold(2, 1.0) for _ in range(40)]
    holds = [hold.id for hold in made]
    answers: dict[str, str] = {}
    sold: list[int] = []
    lock = threading.Lock()
    # The scenario's timing, not a synchronisation: start a quarter second before the
    # median expiry (the store's clock; the database's is this machine's too).
    start = sorted(hold.expires_at for hold in made)[len(made) // 2] - 0.25

    def confirmer(index: int) -> None:
        for turn, hold_id in enumerate(holds[index::8]):
            time.sleep(max(0.0, start + turn * 0.1 - time.time()))
            try:
                outcome, serials = "confirmed", list(store.confirm(hold_id).serials)
            except HoldExpired:
                outcome, serials = "expired", []
            with lock:
                answers[hold_id] = outcome
                sold.extend(serials)

    run_threads(confirmer, 8)
    expired = [hold_id for hold_id, outcome in answers.items() if outcome == "expired"]
    assert 0 < len(expired) < len(answers), "the confirms did not straddle the expiry"
    for hold_id, outcome in answers.items():
        hold = store.get_hold(hold_id)
        assert hold is not None and hold.state == outcome
    assert sorted(sold) == list(range(1, len(sold) + 1))
    counts = store.counts()
    assert (counts.sold, counts.held) == (len(sold), 0)
    poll(lambda: store.counts() and store.holds_expired() == len(expired),
         "the holds to be cleaned up", 15)
