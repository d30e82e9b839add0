"""ticketbooth's load generator: booths that buy over HTTP, measure, and check the promises.

It talks to the service only over HTTP (``--spawn`` starts one as a
subprocess); it never imports ``app``. Its own dependencies (hdrhistogram, tqdm,
matplotlib) come with the ``load`` extra: ``pip install 'ticketbooth[load]'``.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> int:
    """Console script entry point; says what to install when the ``load`` extra is missing."""
    try:
        from loadtest.cli import main as cli_main
    except ImportError as error:
        print(f"ticketbooth-load: error: {error.name or error} is not installed; "
              "install the load generator with: pip install 'ticketbooth[load]'",
              file=sys.stderr)
        return 2
    return cli_main()
