"""Schema migrations with Alembic: upgrade to head, and refuse to run on an out-of-date schema."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from covid_cxr.errors import SchemaOutOfDate
from covid_cxr.settings import Settings
from db.session import create_engine_for

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(settings: Settings, revision: str = "head") -> str:
    """Bring the schema to ``revision``; returns the revision now in place."""
    engine = create_engine_for(settings)
    with engine.begin() as connection:
        config = alembic_config(settings.database)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return current_revision(engine) or ""


#: Databases whose schema this process has found at head: each is checked once, at start-up.
_checked: set[str] = set()


def check_schema(settings: Settings) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at the code's head revision.

    The first successful check per database and process is remembered, so the commands check at
    start-up and the functions they call (the registry, the evaluation job) cost nothing after it.
    """
    if settings.database in _checked:
        return
    current = current_revision(create_engine_for(settings))
    head = head_revision()
    if current != head:
        state = "has no schema" if current is None else f"is at revision {current}"
        raise SchemaOutOfDate(
            f"the database {state}, this code needs {head}: run `covid-cxr db upgrade` first"
        )
    _checked.add(settings.database)


def prepare_database(settings: Settings) -> None:
    """Create the embedded database on first use; otherwise refuse a schema that is not at head.

    Only the embedded default (no ``database_url``) is ever created here: a configured server
    database is migrated on purpose, by ``covid-cxr db upgrade``.
    """
    embedded_file = settings.data_dir.expanduser() / "covid-cxr.sqlite3"
    if settings.database_url is None and not embedded_file.exists():
        revision = upgrade(settings)
        logging.getLogger(__name__).info("created the database %s (schema %s)", embedded_file.resolve(), revision)
        return
    check_schema(settings)
