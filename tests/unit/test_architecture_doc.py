"""docs/architecture.md is the map of the code: it names every module under plugins/, so a room
added without a place on the map fails here."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_architecture_page_names_every_module():
    text = (REPO / "docs" / "architecture.md").read_text()
    modules = sorted(path for path in (REPO / "plugins").rglob("*.py") if path.name != "__init__.py")
    assert modules, "no modules found under plugins/"
    missing = [str(path.relative_to(REPO)) for path in modules if f"`{path.name}`" not in text
               and f"`{path.relative_to(REPO)}`" not in text]
    assert missing == [], f"docs/architecture.md does not name {missing}"
