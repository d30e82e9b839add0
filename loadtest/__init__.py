"""ticketbooth's load generator: booths that buy over HTTP, measure, and check the promises.

It talks to the service only over HTTP (``--spawn`` starts one as a subprocess); it never
imports ``app``. A plain install of ticketbooth has everything it needs; only ``--plot``
needs an extra (``pip install 'ticketbooth[plot]'``, for matplotlib).
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> int:
    """Console script entry point."""
    from loadtest.cli import main as cli_main

    return cli_main()
