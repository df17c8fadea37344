"""Insert-or-ignore and insert-or-update behave the same on SQLite and PostgreSQL and refuse any other database."""

from __future__ import annotations

import pytest
from sqlalchemy import create_mock_engine, select
from sqlalchemy.orm import Session

from covid_cxr.errors import DatabaseError
from covid_cxr.settings import load_settings
from db.migrate import upgrade
from db.models import GroundTruthLabel
from db.session import session_scope
from db.upsert import insert_or_ignore, insert_or_update

KEY = ("key_type", "key_value", "source")


def label(uid: str, value: str, **extra: str) -> dict[str, str]:
    return {"key_type": "study_instance_uid", "key_value": uid, "source": "rt-pcr", "label": value, **extra}


@pytest.fixture
def db_settings(tmp_path, database_url):
    settings = load_settings(data_dir=tmp_path, database_url=database_url)
    upgrade(settings)
    return settings


def stored(settings) -> dict[str, tuple[int, str, str | None]]:
    """StudyInstanceUID -> (row id, label, label date)."""
    with session_scope(settings) as session:
        rows = session.execute(select(GroundTruthLabel.key_value, GroundTruthLabel.id, GroundTruthLabel.label,
                                      GroundTruthLabel.label_date)).all()
    return {row.key_value: (row.id, row.label, row.label_date) for row in rows}


def test_insert_or_ignore_keeps_existing_rows_and_adds_new_ones(db_settings):
    with session_scope(db_settings) as session:
        insert_or_ignore(session, GroundTruthLabel, [label("1.2.1", "covid"), label("1.2.2", "normal")], KEY)
    before = stored(db_settings)
    with session_scope(db_settings) as session:
        insert_or_ignore(session, GroundTruthLabel, [label("1.2.1", "normal"), label("1.2.3", "covid")], KEY)
    after = stored(db_settings)
    assert after["1.2.1"] == before["1.2.1"] and after["1.2.1"][1] == "covid"
    assert set(after) == {"1.2.1", "1.2.2", "1.2.3"}


def test_insert_or_update_replaces_only_the_given_columns_of_a_matching_row(db_settings):
    with session_scope(db_settings) as session:
        insert_or_update(session, GroundTruthLabel, [label("1.2.1", "covid", label_date="2026-11-24")], KEY)
    (row_id, _, _), = stored(db_settings).values()
    with session_scope(db_settings) as session:
        insert_or_update(session, GroundTruthLabel, [label("1.2.1", "normal"), label("1.2.2", "covid")], KEY)
    after = stored(db_settings)
    assert after["1.2.1"] == (row_id, "normal", "2026-11-24")  # same row; the date was not given, so it stays
    assert after["1.2.2"][1:] == ("covid", None)


def test_no_rows_is_no_statement(db_settings):
    with session_scope(db_settings) as session:
        insert_or_ignore(session, GroundTruthLabel, [], KEY)
        insert_or_update(session, GroundTruthLabel, [], KEY)
    assert stored(db_settings) == {}


@pytest.mark.parametrize("upsert", [insert_or_ignore, insert_or_update])
def test_another_database_is_refused_with_a_reason(upsert):
    engine = create_mock_engine("mysql://", executor=lambda *_, **__: None)
    with pytest.raises(DatabaseError, match="'mysql'.*SQLite or PostgreSQL") as caught:
        upsert(Session(bind=engine), GroundTruthLabel, [label("1.2.1", "covid")], KEY)
    assert caught.value.reason == "unsupported_dialect"
