"""The lock files agree with pyproject.toml (offline: nothing is resolved or downloaded).

``make lock`` writes requirements/run.txt (the service, the PostgreSQL driver, the load
generator: what ``make run`` and the image install) and requirements/dev.txt (all that, plus
matplotlib and the test and dev tools: what ``make test`` installs), both with hashes. A
change to pyproject.toml's dependencies that is not locked fails here, naming the package.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The extras each lock holds, besides the dependencies and the build requirements.
LOCKS = {"run.txt": ("postgres",), "dev.txt": ("postgres", "plot", "test", "dev")}
#: How pip-compile names pyproject.toml as the reason for a pin.
FROM_PROJECT = "ticketbooth (pyproject.toml)"
FROM_BUILD = "ticketbooth (pyproject.toml::build-system.requires)"


@dataclass
class Pin:
    version: str
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)


def parse_lock(text: str) -> dict[str, Pin]:
    """name -> Pin, from pip-compile's output (``name==version \\``, hashes, ``# via`` lines)."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in text.splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            current = pins[canonicalize_name(match[1])] = Pin(match[2])
        elif current and (match := re.match(r"^\s+--hash=(\S+)", line)):
            current.hashes.append(match[1])
        elif current and (match := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)):
            if match[1] != "via":
                current.via.add(match[1].strip())
        elif line and not line.startswith((" ", "#")):
            raise ValueError(f"a line pip-compile does not write: {line!r}")
    return pins


def required(extras: tuple[str, ...]) -> list[Requirement]:
    project = PYPROJECT["project"]
    names = [*project["dependencies"],
             *(r for extra in extras for r in project["optional-dependencies"][extra])]
    return [Requirement(r) for r in names]


def build_required() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]


@pytest.fixture(scope="module", params=sorted(LOCKS))
def lock(request: pytest.FixtureRequest) -> tuple[str, dict[str, Pin]]:
    name = str(request.param)
    return name, parse_lock((ROOT / "requirements" / name).read_text())


def test_parse_lock() -> None:
    text = ("#\n#    make lock\n#\nflask==3.1.3 \\\n    --hash=sha256:aa \\\n"
            "    --hash=sha256:bb\n    # via\n    #   schemathesis\n"
            f"    #   {FROM_PROJECT}\nWerkzeug==3.1.9 \\\n    --hash=sha256:cc\n"
            "    # via flask\n")
    assert parse_lock(text) == {
        "flask": Pin("3.1.3", ["sha256:aa", "sha256:bb"], {"schemathesis", FROM_PROJECT}),
        "werkzeug": Pin("3.1.9", ["sha256:cc"], {"flask"})}


def test_every_requirement_is_locked_at_a_version_it_allows(
        lock: tuple[str, dict[str, Pin]]) -> None:
    name, pins = lock
    wrong = []
    for requirement in [*required(LOCKS[name]), *build_required()]:
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            wrong.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            wrong.append(f"{requirement} but the lock has {pin.version}")
    assert not wrong, f"requirements/{name} is out of date (run make lock): {wrong}"


def test_the_lock_holds_nothing_pyproject_no_longer_asks_for(
        lock: tuple[str, dict[str, Pin]]) -> None:
    name, pins = lock
    for reason, requirements in ((FROM_PROJECT, required(LOCKS[name])),
                                 (FROM_BUILD, build_required())):
        locked_for = {n for n, pin in pins.items() if reason in pin.via}
        asked = {canonicalize_name(r.name) for r in requirements}
        assert locked_for == asked, (
            f"requirements/{name} is out of date (run make lock): locked for {reason} but "
            f"not asked for: {sorted(locked_for - asked)}; asked for but not locked for it: "
            f"{sorted(asked - locked_for)}")


def test_every_pin_has_a_hash(lock: tuple[str, dict[str, Pin]]) -> None:
    name, pins = lock
    assert pins
    assert [n for n, pin in pins.items() if not pin.hashes] == [], name


def test_the_locks_agree_with_each_other() -> None:
    run = parse_lock((ROOT / "requirements" / "run.txt").read_text())
    dev = parse_lock((ROOT / "requirements" / "dev.txt").read_text())
    differ = {n: (pin.version, dev[n].version if n in dev else None)
              for n, pin in run.items()
              if n not in dev or (pin.version, sorted(pin.hashes))
              != (dev[n].version, sorted(dev[n].hashes))}
    assert differ == {}, "requirements/run.txt and dev.txt disagree (run make lock)"


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_no_index_url_or_local_path_in_the_lock(name: str) -> None:
    """The lock names packages and hashes only: no index, no path of the machine it was made on
    (make lock passes --no-emit-index-url and --no-emit-find-links)."""
    text = (ROOT / "requirements" / name).read_text()
    assert not re.search(r"--(extra-)?index-url|--find-links|://|/", text)


def lower_bound(requirement: Requirement) -> Version | None:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    return max(floors) if floors else None


def test_floors_are_pyprojects_lower_bounds() -> None:
    """requirements/floors.txt (make floors) pins each runtime and postgres dependency at the
    lowest version pyproject.toml allows."""
    text = (ROOT / "requirements" / "floors.txt").read_text()
    floors = {canonicalize_name(m[1]): Version(m[2])
              for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", text, re.M)}
    wrong = [f"{r}: floors.txt has {floors.get(canonicalize_name(r.name))}"
             for r in required(LOCKS["run.txt"])
             if floors.get(canonicalize_name(r.name)) != lower_bound(r)]
    assert not wrong, wrong
