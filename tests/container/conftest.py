"""What the container tests share: podman ready to use, and their measured durations, shown at
the end of the run and kept in test-artifacts/NAME-timings.json (NAME: the module's, less
"test_")."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import podman_engine as engine
import pytest

_SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def container_summary(request: pytest.FixtureRequest) -> list[str]:
    """Lines to show under "container test timings" when the run ends."""
    return request.config.stash.setdefault(_SUMMARY, [])


@pytest.fixture(scope="module")
def timings(
    request: pytest.FixtureRequest, container_summary: list[str]
) -> Iterator[engine.Timings]:
    """Measured durations and figures of one test module."""
    name = Path(str(request.module.__file__)).stem.removeprefix("test_")
    found = engine.Timings()
    started = time.perf_counter()
    yield found
    found.seconds["module total"] = time.perf_counter() - started
    container_summary.append(f"{name}:")
    container_summary.extend(f"  {key}: {value:.2f} s" for key, value in found.seconds.items())
    container_summary.extend(f"  {key}: {value}" for key, value in found.notes.items())
    out = engine.REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / f"{name}-timings.json").write_text(
        json.dumps({"seconds": found.seconds, "notes": found.notes}, indent=2) + "\n"
    )


@pytest.fixture(scope="module")
def podman(timings: engine.Timings) -> engine.Podman:
    """Podman and friends installed (from Debian's packages when missing) and configured."""
    started = time.perf_counter()
    headline = "NO CONTAINER ENGINE, the container tests cannot run"
    installed = engine.or_fail(headline, engine.ensure_tools)
    session = engine.or_fail(headline, engine.podman_session)
    if installed:
        timings.seconds["install podman & co from Debian"] = installed
    timings.seconds["podman ready"] = time.perf_counter() - started
    return session


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_SUMMARY, [])
    if lines:
        terminalreporter.section("container test timings")
        for line in lines:
            terminalreporter.write_line(line)
