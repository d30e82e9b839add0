"""The lesson's warning, made runnable: the memory store with its lock taken away.

Between reading the counter and writing it back, the thread yields (the lesson's chore),
so concurrent buyers read the same count, get the same serials, and oversell. The server
refuses this store unless ``--allow-unsafe`` is given.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from app.stores.memory import MemoryStore

__all__ = ["UnsafeMemoryStore"]

#: The yield between read and write when no --chore-ms is set: long enough that any two
#: concurrent buyers overlap.
DEFAULT_YIELD_S = 0.005


class UnsafeMemoryStore(MemoryStore):
    def __init__(self, tickets: int, *, chore_s: float = 0.0, key_ttl: float = 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(tickets, chore_s=chore_s or DEFAULT_YIELD_S, key_ttl=key_ttl,
                         clock=clock)
        self._lock = contextlib.nullcontext()  # the bug: no lock around read-check-write
