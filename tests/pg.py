"""The throwaway PostgreSQL server the tests use: one implementation, shared with the bench.

It lives in ``loadtest/bench_pg.py`` because ``make bench`` starts one too.
"""

from __future__ import annotations

from loadtest.bench_pg import PostgresServer, PostgresUnavailable, find_bindir, free_port

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir", "free_port"]
