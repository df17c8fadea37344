"""Tests for the docs site (mkdocs.yml, docs/, docs/hooks.py): it builds without warnings and shows the code's facts."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import covid_cxr
from covid_cxr.settings import ENV_PREFIX, Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def docs_hooks() -> ModuleType:
    """docs/hooks.py, whose constants name where the generated tables come from."""
    spec = importlib.util.spec_from_file_location("covid_cxr_docs_hooks", REPO_ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by ``mkdocs build --strict``, which must succeed without a single warning."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO_ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert [line for line in log.splitlines() if "WARNING" in line] == []
    return out


def section(page: Path, anchor: str) -> str:
    """The HTML of one ``##`` section of a built page, found by its heading's id."""
    text = page.read_text(encoding="utf-8")
    start = text.index(f'<h2 id="{anchor}">')
    end = text.find("<h2 ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_the_docs_build_without_warnings(site: Path) -> None:
    for page in ("index", "operate", "operations", "configure", "preprocessing", "model", "sql", "benchmarks",
                 "architecture", "development", "changelog"):
        assert (site / f"{page}.html").is_file(), page
    assert (site / "reports" / "demo-report.html").is_file(), "docs/reports/ is published with the site"


def test_the_settings_table_lists_every_settings_field(site: Path) -> None:
    table = section(site / "configure.html", "settings-reference")
    rows = re.findall(r"<tr>\s*<td><code>(" + ENV_PREFIX + r"[A-Z_]+)</code></td>", table)
    assert rows == [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]
    for field in Settings.model_fields.values():
        assert field.description, "every setting is described (the table shows it)"


def test_the_reason_table_lists_every_reason_code(site: Path) -> None:
    table = section(site / "preprocessing.html", "reason-codes")
    rows = re.findall(r"<tr>\s*<td><code>([a-z_]+)</code></td>", table)
    hooks = docs_hooks()
    assert rows == [reason.value for reason in hooks.table_reasons()] and "not_dicom" in rows


def test_the_architecture_page_states_the_enforced_import_directions() -> None:
    from test_architecture import ALLOWED

    page = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layers = page.split("\n## Layers and allowed imports\n", 1)[1].split("\n## ", 1)[0]
    stated: dict[str, frozenset[str]] = {}
    for package, may_import in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", layers, flags=re.MULTILINE):
        everything = frozenset(ALLOWED) - {package}
        stated[package] = everything if may_import.strip() == "everything" else frozenset(
            re.findall(r"`(\w+)`", may_import))
    assert list(stated) == list(ALLOWED), "the same layers, lowest first"
    assert stated == ALLOWED


def test_no_placeholder_is_left_and_nothing_comes_from_the_internet(site: Path) -> None:
    for page in site.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert "<!-- generated:" not in text, page.name
        assert not re.search(r"""<(?:script|img)[^>]+src=["']https?://""", text), f"{page.name} loads a remote script"
        assert not re.search(r"""<link[^>]+href=["']https?://""", text), f"{page.name} loads a remote stylesheet"


def test_the_docs_and_the_changelog_state_the_one_version(site: Path) -> None:
    assert f"covid-cxr {covid_cxr.__version__}" in (site / "index.html").read_text(encoding="utf-8")
    changelog = (REPO_ROOT / "docs" / "changelog.md").read_text(encoding="utf-8")
    assert re.search(rf"^## {re.escape(covid_cxr.__version__)}\b", changelog, flags=re.MULTILINE), \
        "the changelog has a section for the current version"


def test_the_reason_page_lists_the_whole_catalogue(site: Path) -> None:
    from covid_cxr.reasons import Reason

    text = (site / "reasons.html").read_text(encoding="utf-8")
    missing = [reason.value for reason in Reason if f"<code>{reason.value}</code>" not in text]
    assert not missing
