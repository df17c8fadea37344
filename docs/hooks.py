"""MkDocs hook that fills the pages' generated parts (settings table, reason codes, version) from the code."""

from __future__ import annotations

import importlib
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

#: Where each generated part comes from, as ``module:attribute``.
SETTINGS_SOURCE = "covid_cxr.settings:Settings"
ENV_PREFIX_SOURCE = "covid_cxr.settings:ENV_PREFIX"
#: The reason-code catalogue: an enum whose members have a ``kind`` and a ``description``.
REASONS_SOURCE = "covid_cxr.reasons:Reason"
#: The kind of code the reason table lists: why ingest refused a file.
REASON_TABLE_KIND = "rejection"
VERSION_SOURCE = "covid_cxr:__version__"

#: ``<!-- generated: NAME -->`` in a page is replaced by the output of ``GENERATORS[NAME]``.
PLACEHOLDER = re.compile(r"<!-- generated: ([a-z-]+) -->")

_TYPE_NAMES = {"Path": "path", "str": "text", "SecretStr": "secret text", "int": "integer", "float": "number",
               "bool": "`true` or `false`", "Destination": "destination"}
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def load(source: str) -> Any:
    """The object that ``module:attribute`` names."""
    module, _, attribute = source.partition(":")
    return getattr(importlib.import_module(module), attribute)


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Import the code from this checkout (before any installed copy) and put its version in the site name."""
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    config.site_name = f"{config.site_name} {version()}"
    return config


def on_page_markdown(markdown: str, /, *, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Replace every placeholder; an unknown one stops the build instead of vanishing from the page."""

    def generate(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: unknown placeholder {match.group(0)!r}; "
                              f"known: {', '.join(sorted(GENERATORS))}")
        return GENERATORS[name]()

    return PLACEHOLDER.sub(generate, markdown)


def version() -> str:
    """The package version, from its one source."""
    return str(load(VERSION_SOURCE))


def settings_table() -> str:
    """One row per settings field: environment variable, type, default, description."""
    prefix = str(load(ENV_PREFIX_SOURCE))
    rows = ["| environment variable | type | default | description |", "|---|---|---|---|"]
    for name, field in load(SETTINGS_SOURCE).model_fields.items():
        kind = ", ".join([type_text(field.annotation), *bound_texts(field.metadata)])
        default = default_text(field.get_default(call_default_factory=True))
        rows.append(f"| `{prefix}{name.upper()}` | {kind} | {default} | {cell(field.description or '')} |")
    return "\n".join(rows)


def reason_source() -> str:
    """Where the reason codes come from, as a dotted name."""
    return f"`{REASONS_SOURCE.replace(':', '.')}`"


def table_reasons() -> list[Any]:
    """The catalogue's codes the reason table lists, in the catalogue's order."""
    return [reason for reason in load(REASONS_SOURCE) if reason.kind == REASON_TABLE_KIND]


def reason_table() -> str:
    """One row per rejection code of the catalogue: the code and its description."""
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| `{reason.value}` | {cell(reason.description)} |" for reason in table_reasons()]
    return "\n".join(rows)


def type_text(annotation: Any) -> str:
    """A field's type in an operator's words: ``path or unset`` reads better than ``Path | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(f"`{value}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(arg) for arg in args if arg is not type(None))
    if origin in (frozenset, set, list, tuple):
        return f"list of {type_text(args[0])}"
    name = getattr(annotation, "__name__", str(annotation))
    return _TYPE_NAMES.get(name, name)


def bound_texts(metadata: list[Any]) -> list[str]:
    """Pydantic's numeric constraints (``gt=0``, ``le=1024``) as ``> 0``, ``≤ 1024``."""
    return [f"{symbol} {getattr(item, key)}" for item in metadata for key, symbol in _BOUNDS if hasattr(item, key)]


def default_text(value: Any) -> str:
    """A default as the environment variable would spell it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, frozenset | set | list | tuple):
        return f"`{','.join(sorted(str(item) for item in value))}`" if value else "empty"
    return f"`{value}`"


def cell(text: str) -> str:
    """Text for a Markdown table cell: pipes, asterisks and angle brackets are not markup here."""
    for character, escaped in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("<", "&lt;")):
        text = text.replace(character, escaped)
    return " ".join(text.split())


def reason_catalogue() -> str:
    """Every code of the catalogue, one table per kind, in the catalogue's order."""
    reasons = list(load(REASONS_SOURCE))
    sections: list[str] = []
    for kind in dict.fromkeys(reason.kind for reason in reasons):
        rows = [f"## {str(kind).replace('_', ' ').capitalize()}", "", "| code | meaning |", "|---|---|"]
        rows += [f"| `{reason.value}` | {cell(reason.description)} |" for reason in reasons if reason.kind == kind]
        sections.append("\n".join(rows))
    return "\n\n".join(sections)


GENERATORS: dict[str, Callable[[], str]] = {
    "settings-table": settings_table,
    "reason-table": reason_table,
    "reason-catalogue": reason_catalogue,
    "reason-source": reason_source,
    "version": version,
}
