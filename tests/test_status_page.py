"""The status page at GET /, in a real headless Chromium against a real server.

Debian's /usr/bin/chromium, driven by Playwright for Python (tests/browser.py); the
server listens on 127.0.0.1, port 0. Playwright's expect() waits for each state, so no
test sleeps. Every test also checks that the page asked nothing of any other host and
raised no script error. Screenshots are kept in test-artifacts/.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Page, expect

from app.settings import Settings
from app.stores import open_store
from tests.browser import ARTIFACTS
from tests.conftest import service_process, serving


class Visitor:
    """One browser context: its pages, every request they made, every script error."""

    def __init__(self, browser: Browser) -> None:
        self.context = browser.new_context(viewport={"width": 800, "height": 900})
        self.requested: list[str] = []
        self.script_errors: list[str] = []
        self.context.on("request", lambda request: self.requested.append(request.url))

    def open(self, url: str, hold_timers: bool = False) -> Page:
        """Load the page; with ``hold_timers`` its setTimeout never fires (no polling)."""
        page = self.context.new_page()
        page.on("pageerror", lambda error: self.script_errors.append(str(error)))
        if hold_timers:
            page.clock.install()
        page.goto(f"{url}/")
        return page

    def assert_kept_to(self, *urls: str) -> None:
        """Every request went to one of these servers, and no script failed."""
        assert self.requested, "the page made no request at all"
        strays = [seen for seen in self.requested
                  if not any(seen.startswith(f"{url}/") for url in urls)]
        assert not strays, f"requests to other hosts: {strays}"
        assert not self.script_errors, self.script_errors


@pytest.fixture
def visitor(browser: Browser) -> Iterator[Visitor]:
    visitor = Visitor(browser)
    yield visitor
    visitor.context.close()


@contextmanager
def booth(tickets: int) -> Iterator[str]:
    """An in-process server over a memory store of ``tickets``; yields its URL."""
    settings = Settings(store="memory", tickets=tickets)
    store = open_store(settings)
    try:
        with serving(settings, store) as url:
            yield url
    finally:
        store.close()


def expect_counts(page: Page, remaining: int, sold: int, total: int, held: int = 0) -> None:
    expect(page.locator("#remaining")).to_have_text(str(remaining))
    expect(page.locator("#sold")).to_have_text(str(sold))
    expect(page.locator("#held")).to_have_text(str(held))
    expect(page.locator("#total")).to_have_text(str(total))


def test_held_tickets_show_beside_sold_and_remaining(visitor: Visitor) -> None:
    with booth(tickets=4) as url:
        page = visitor.open(url)
        expect_counts(page, remaining=4, sold=0, total=4)
        hold = requests.post(f"{url}/holds", json={"quantity": 3}, timeout=5).json()
        expect_counts(page, remaining=1, sold=0, held=3, total=4)  # seen by the next poll
        page.get_by_role("button", name="Buy a ticket").click()
        expect_counts(page, remaining=0, sold=1, held=3, total=4)
        expect(page.locator("#soldout")).to_contain_text("sold or held")
        requests.post(f"{url}/holds/{hold['id']}/confirm", timeout=5)
        expect_counts(page, remaining=0, sold=4, held=0, total=4)
        expect(page.locator("#soldout")).to_have_text("Sold out: every ticket has been sold.")


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_buy_until_sold_out(visitor: Visitor) -> None:
    with booth(tickets=5) as url:
        page = visitor.open(url)
        expect_counts(page, remaining=5, sold=0, total=5)
        buy, result = page.get_by_role("button", name="Buy a ticket"), page.locator("#result")

        buy.click()
        expect(result).to_have_text("You got ticket #1")
        expect_counts(page, remaining=4, sold=1, total=5)

        for serial in range(2, 6):
            buy.click()
            expect(result).to_have_text(f"You got ticket #{serial}")
        expect_counts(page, remaining=0, sold=5, total=5)
        expect(page.locator("#buy")).to_be_disabled()
        expect(page.locator("#buy")).to_have_text("Sold out")
        expect(page.locator("#soldout")).to_be_visible()
        assert requests.get(f"{url}/remaining", timeout=5).json()["sold"] == 5

        # The chart counts the five sales, from the sold deltas between polls.
        expect(page.locator("#rate-total")).to_have_text("5")
        bins = page.locator("#rate-chart").get_attribute("data-bins") or ""
        assert sum(int(n) for n in bins.split(",")) == 5 and len(bins.split(",")) == 12
        screenshot(page, "status-page.png")

        page.set_viewport_size({"width": 360, "height": 740})
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow == 0, f"the page scrolls sideways by {overflow}px on a narrow screen"
        screenshot(page, "status-page-narrow.png")
        visitor.assert_kept_to(url)


def test_someone_else_buys_the_last_ticket(visitor: Visitor) -> None:
    with booth(tickets=1) as url:
        # The page polls once on load and then not again before the click below.
        page = visitor.open(url, hold_timers=True)
        expect_counts(page, remaining=1, sold=0, total=1)

        assert requests.post(f"{url}/buy", timeout=5).status_code == 200
        page.locator("#buy").click()
        expect(page.locator("#result")).to_contain_text("Sold out:")
        expect(page.locator("#remaining")).to_have_text("0")
        expect(page.locator("#buy")).to_be_disabled()
        visitor.assert_kept_to(url)


def test_polling_shows_sales_made_elsewhere(visitor: Visitor) -> None:
    with booth(tickets=3) as url:
        page = visitor.open(url)
        expect_counts(page, remaining=3, sold=0, total=3)
        requests.post(f"{url}/buy", json={"quantity": 3}, timeout=5).raise_for_status()
        expect_counts(page, remaining=0, sold=3, total=3)
        expect(page.locator("#buy")).to_be_disabled()
        expect(page.locator("#rate-total")).to_have_text("3")
        visitor.assert_kept_to(url)


def test_shows_the_service_error(visitor: Visitor, tmp_path: Path) -> None:
    """A real 503 from /buy: the database itself refuses every new sale."""
    database = tmp_path / "tickets.db"
    with service_process("--tickets", "2", "--store", f"sqlite:///{database}") as service:
        url = service.url
        page = visitor.open(url)
        expect_counts(page, remaining=2, sold=0, total=2)
        with sqlite3.connect(database) as db:
            db.execute("CREATE TRIGGER fail BEFORE INSERT ON sales "
                       "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
        page.locator("#buy").click()
        expect(page.locator("#result")).to_contain_text(
            "Could not buy (store_unavailable): the sale was not recorded")
        expect(page.locator("#buy")).to_be_enabled()
        expect_counts(page, remaining=2, sold=0, total=2)
        visitor.assert_kept_to(url)


def test_unreachable_service_then_recovery(visitor: Visitor, tmp_path: Path) -> None:
    """The server process dies; the page says so; a new one on the same port and store."""
    args: list[Any] = ["--tickets", "4", "--store", f"sqlite:///{tmp_path / 'tickets.db'}"]
    with service_process(*args) as service:
        url = service.url
        page = visitor.open(url)
        expect_counts(page, remaining=4, sold=0, total=4)
        page.locator("#buy").click()
        expect(page.locator("#result")).to_have_text("You got ticket #1")
        service.process.kill()
        service.process.wait(timeout=10)
        expect(page.locator("#conn")).to_be_visible()
        expect(page.locator("#conn")).to_contain_text("Can't reach the ticket booth")
        screenshot(page, "status-page-unreachable.png")

    port = url.rsplit(":", 1)[1]
    with service_process(*args, "--port", port) as again:
        assert again.url == url
        expect(page.locator("#conn")).to_be_hidden()
        expect_counts(page, remaining=3, sold=1, total=4)
        page.locator("#buy").click()
        expect(page.locator("#result")).to_have_text("You got ticket #2")
        visitor.assert_kept_to(url)
