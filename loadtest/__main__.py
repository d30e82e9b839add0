"""``python -m loadtest``: the same as the ``ticketbooth-load`` console script."""

from loadtest.cli import main

# Guarded: --processes starts workers with "spawn", which imports this module again.
if __name__ == "__main__":
    raise SystemExit(main())
