"""The package boundaries the docs promise, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names only (relative imports stay inside)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize(("package", "forbidden"), [
    # The load generator talks to the service over HTTP only.
    ("loadtest", {"app", "bench", "tests"}),
    # The service knows nothing of its load generator, the bench or the tests.
    ("app", {"loadtest", "bench", "tests"}),
])
def test_package_imports_none_of(package: str, forbidden: set[str]) -> None:
    found = sorted(
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] in forbidden)
    assert not found, found
