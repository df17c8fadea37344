"""Migrations build the schema from scratch on SQLite and PostgreSQL and match the models."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from covid_cxr.errors import SchemaOutOfDate
from covid_cxr.settings import load_settings
from db.migrate import check_schema, head_revision, upgrade
from db.models import Base
from db.session import create_engine_for


def _settings(tmp_path: Path, url: str | None = None):
    return load_settings(data_dir=tmp_path, database_url=url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request, tmp_path):
    if request.param == "sqlite":
        return _settings(tmp_path)
    return _settings(tmp_path, request.getfixturevalue("postgres_url"))


def test_fresh_database_is_refused_until_upgraded(db_settings):
    with pytest.raises(SchemaOutOfDate, match="covid-cxr db upgrade"):
        check_schema(db_settings)
    assert upgrade(db_settings) == head_revision()
    check_schema(db_settings)


def test_migrated_schema_equals_models(db_settings):
    upgrade(db_settings)
    engine = create_engine_for(db_settings)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent_and_cli_reports_revision(tmp_path, capsys):
    from service.cli import main

    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert main(["db", "upgrade", "--data-dir", str(tmp_path)]) == 0
    assert main(["db", "current", "--data-dir", str(tmp_path)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_one_primary_row_per_sop_instance_uid(tmp_path):
    settings = _settings(tmp_path)
    upgrade(settings)
    engine = create_engine_for(settings)
    insert = sa.text(
        "INSERT INTO instances (state, attempts, file_name, file_sha256, sop_instance_uid, duplicate_of_id, conflict,"
        " created_at, updated_at)"
        " VALUES ('received', 0, 'f', :sha, '1.2.3', :dup, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )
    with engine.begin() as conn:
        conn.execute(insert, {"sha": "a" * 64, "dup": None})
        conn.execute(insert, {"sha": "a" * 64, "dup": 1})  # a duplicate row is allowed
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(insert, {"sha": "b" * 64, "dup": None})  # a second primary row is not
