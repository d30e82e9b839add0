"""Store backends, chosen from the ``--store`` URL in one place."""

from __future__ import annotations

import time
from collections.abc import Callable

from app.inventory import Store
from app.settings import Settings

__all__ = ["StoreSetupError", "open_store"]


class StoreSetupError(RuntimeError):
    """The store cannot be opened as configured; the message is one line for the user."""


def open_store(settings: Settings, *, clock: Callable[[], float] = time.time) -> Store:
    """Open the store that ``settings.store`` names. ``clock`` dates sales and keys."""
    url = settings.store
    chore_s = settings.chore_ms / 1000.0
    ttl = settings.idempotency_ttl
    if url == "memory":
        from app.stores.memory import MemoryStore

        return MemoryStore(settings.tickets, chore_s=chore_s, key_ttl=ttl, clock=clock)
    if url == "unsafe-memory":
        if not settings.allow_unsafe:
            raise StoreSetupError("--store unsafe-memory oversells on purpose; "
                                  "add --allow-unsafe to run it anyway")
        from app.stores.unsafe import UnsafeMemoryStore

        return UnsafeMemoryStore(settings.tickets, chore_s=chore_s, key_ttl=ttl, clock=clock)
    if url.startswith("sqlite:"):
        from app.stores.sqlite import SqliteStore, path_from_url

        return SqliteStore(path_from_url(url), settings.tickets, chore_s=chore_s, key_ttl=ttl,
                           order_timeout=settings.order_timeout, clock=clock)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from app.stores.postgres import PostgresStore
        except ImportError as error:  # the driver comes with the postgres extra
            raise StoreSetupError(f"--store {url.split(':', 1)[0]}:// needs psycopg and "
                                  f"psycopg-pool ({error}): pip install "
                                  "'ticketbooth[postgres]'") from error

        return PostgresStore(url, settings.tickets, pool_size=settings.pool_size,
                             chore_s=chore_s, key_ttl=ttl,
                             order_timeout=settings.order_timeout,
                             clock=clock)
    raise StoreSetupError(f"unknown store {url!r}: use memory, sqlite:///PATH, "
                          "postgresql://USER@HOST:PORT/DB or unsafe-memory")
