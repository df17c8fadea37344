"""The layers hold: no first-party import points from a lower package to a higher one.

The allowed directions are stated once here and on the docs' architecture page; every import
statement counts, also those inside functions (they still couple the packages).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Each package and the first-party packages it may import (besides itself), lowest layer first.
ALLOWED: dict[str, frozenset[str]] = {
    "covid_cxr": frozenset(),
    "db": frozenset({"covid_cxr"}),
    "ingest": frozenset({"covid_cxr", "db"}),
    "taskqueue": frozenset({"covid_cxr", "db"}),
    "model_store": frozenset({"covid_cxr", "db", "ingest"}),
    "delivery": frozenset({"covid_cxr", "db", "model_store"}),
    "worker": frozenset({"covid_cxr", "db", "ingest", "model_store", "taskqueue", "delivery"}),
    "web": frozenset({"covid_cxr", "db", "taskqueue", "model_store", "worker"}),
    # The composition root: wires everything, imported by nothing.
    "service": frozenset({"covid_cxr", "db", "ingest", "taskqueue", "model_store", "delivery", "worker", "web"}),
}
#: Entry-point shims, run as scripts and never imported: ``python -m covid_cxr`` starts the composition root.
ENTRY_POINTS = frozenset({"covid_cxr/__main__.py"})


def first_party_imports(path: Path) -> set[tuple[int, str]]:
    """``(line, top-level package)`` of every absolute first-party import in ``path``."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found.update((node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in ALLOWED)
    return found


def package_files() -> list[Path]:
    return sorted(p for package in ALLOWED for p in (REPO_ROOT / package).rglob("*.py"))


def test_every_package_is_placed_in_a_layer() -> None:
    on_disk = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")} - {"tests", "bench", "docs", "scripts"}
    assert on_disk == set(ALLOWED), "a new top-level package needs its place in ALLOWED and the architecture page"


def test_the_layers_form_no_cycle() -> None:
    order = list(ALLOWED)
    for package, allowed in ALLOWED.items():
        assert all(order.index(dependency) < order.index(package) for dependency in allowed), package


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    relative = path.relative_to(REPO_ROOT).as_posix()
    if relative in ENTRY_POINTS:
        return
    package = relative.split("/")[0]
    wrong = sorted((line, name) for line, name in first_party_imports(path)
                   if name != package and name not in ALLOWED[package])
    assert not wrong, f"{relative} imports a higher layer: " + ", ".join(f"line {n}: {m}" for n, m in wrong)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text("import os\n\ndef f():\n    from worker.tasks import run_batch\n    import db.models\n")
    assert first_party_imports(source) == {(4, "worker"), (5, "db")}
