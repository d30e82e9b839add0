"""``python -m app serve`` runs the same command line as ``ticketbooth serve``."""

from app.cli import main

if __name__ == "__main__":
    main()
