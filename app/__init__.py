"""ticketbooth: an HTTP ticket booth that sells a fixed stock exactly once."""

__version__ = "0.1.0"
