"""``python -m loadtest``: the same as the ``ticketbooth-load`` console script."""

from loadtest.cli import main

raise SystemExit(main())
