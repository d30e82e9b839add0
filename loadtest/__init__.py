"""ticketbooth's load generator: booths that buy over HTTP, measure, and check the promises.

It talks to the service only over HTTP (``--spawn`` starts one as a
subprocess); it never imports ``app``.
"""

from loadtest.cli import main, run

__all__ = ["main", "run"]
