"""The docs stay in step with the code: every setting documented, every relative link alive."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import describe

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SETTING_ROW = re.compile(r"^\| `(--[a-z-]+)` \| `(TICKETBOOTH_[A-Z_]+)` \| `([^`]*)` \|", re.M)


def shown_default(default: str) -> str:
    """A setting's default as the table shows it: no quotes, lower-case booleans, 1.0 as 1."""
    default = default.strip("'")
    if default in ("True", "False"):
        return default.lower()
    return default.removesuffix(".0")


@pytest.mark.parametrize(("raw", "shown"), [
    ("'127.0.0.1'", "127.0.0.1"), ("False", "false"), ("86400.0", "86400"), ("0.5", "0.5"),
    ("(unset)", "(unset)"), ("4", "4"),
])
def test_shown_default(raw: str, shown: str) -> None:
    assert shown_default(raw) == shown


def test_operations_doc_documents_every_setting() -> None:
    table = {flag: (variable, default) for flag, variable, default in
             SETTING_ROW.findall((ROOT / "docs" / "operations.md").read_text())}
    expected = {flag: (variable, shown_default(default))
                for flag, variable, default, _help in describe()}
    assert table == expected


def slug(heading: str) -> str:
    """The anchor a code host gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    text = without_code_blocks(path.read_text())
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Retrying safely: `Idempotency-Key`", "retrying-safely-idempotency-key"),
    ("The threading lesson, made real", "the-threading-lesson-made-real"),
    ("With compose", "with-compose"),
])
def test_slug(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_something_that_exists(doc: Path) -> None:
    broken = []
    for target in LINK.findall(without_code_blocks(doc.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        name, _, anchor = target.partition("#")
        linked = (doc.parent / name).resolve() if name else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_docs_are_found() -> None:
    assert {p.name for p in DOCS} >= {"README.md", "api.md", "stores.md", "operations.md",
                                     "loadtest.md", "container.md", "performance.md"}
