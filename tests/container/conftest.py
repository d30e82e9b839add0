"""Shows the container test's measured durations at the end of the run."""

from __future__ import annotations

import pytest

_SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def container_summary(request: pytest.FixtureRequest) -> list[str]:
    """Lines to show under "container test timings" when the run ends."""
    return request.config.stash.setdefault(_SUMMARY, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("container test timings")
        for line in lines:
            terminalreporter.write_line(line)
