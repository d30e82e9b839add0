"""Debian's Chromium, driven by Playwright for Python, for the status page test.

Playwright's own browser download cannot work here, so it is never used: Playwright
launches ``/usr/bin/chromium`` (Debian's package ``chromium``, installed by
``make browser-deps``) with flags that keep it off the network except for the pages the
test opens. Playwright gives every launch a new, empty profile directory of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Playwright

__all__ = ["ARTIFACTS", "CHROMIUM", "CHROMIUM_FLAGS", "launch_chromium"]

CHROMIUM = Path("/usr/bin/chromium")

# Without the background-networking flags Chromium keeps trying to reach Google's hosts,
# which this machine's closed network refuses; --no-sandbox because the tests run as root.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Screenshots land here (gitignored), next to the other tests' artifacts.
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def launch_chromium(playwright: Playwright) -> Browser:
    """Launch headless Debian Chromium; fail loudly (never skip) when it is not installed."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make browser-deps` (installs Debian's "
                    "chromium package) and run the tests again", pytrace=False)
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=CHROMIUM_FLAGS)
