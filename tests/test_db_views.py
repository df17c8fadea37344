"""The analyst views return the same rows on SQLite and PostgreSQL, with ground truth resolved by specificity."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from covid_cxr.settings import load_settings
from db.migrate import MIGRATIONS_DIR, alembic_config, head_revision, upgrade
from db.models import (
    EvaluationReport,
    GroundTruthLabel,
    Instance,
    NormalizedImage,
    Prediction,
    Study,
    StudyResult,
)
from db.session import create_engine_for, session_scope
from db.views import CURRENT_VIEWS

DAY1 = datetime(2026, 11, 20, 23, 30, tzinfo=UTC)  # late evening: the day must be the UTC day
DAY2 = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    settings = load_settings(data_dir=tmp_path, database_url=url)
    upgrade(settings)
    return settings


def seed(settings) -> None:
    """Three studies, predictions of two model versions, rejects on two days, and labels of every key type.

    Study 1 has a study label (covid) and one image with its own label (normal): the image label wins
    for that image only. Study 2's accession number has two sources that disagree: a conflict.
    Study 3 has no label.
    """
    with session_scope(settings) as session:
        studies = [Study(study_instance_uid=f"1.2.3.{n}", accession_number=f"A{n}", study_date="20261120",
                         created_at=DAY1) for n in (1, 2, 3)]
        session.add_all(studies)
        session.flush()

        def instance(n: int, state: str, study: Study | None = None, reason: str | None = None,
                     created_at: datetime = DAY1) -> Instance:
            row = Instance(state=state, reason=reason, file_name=f"f{n}.dcm", file_sha256=f"{n:064d}",
                           study_id=study.id if study else None,
                           study_instance_uid=study.study_instance_uid if study else None,
                           sop_instance_uid=f"{study.study_instance_uid}.{n}" if study else None,
                           view_position="PA", modality="DX", created_at=created_at)
            session.add(row)
            session.flush()
            return row

        i1, i2 = instance(1, "predicted", studies[0]), instance(2, "predicted", studies[0])
        i3, i4 = instance(3, "predicted", studies[1]), instance(4, "predicted", studies[2], created_at=DAY2)
        instance(5, "rejected", reason="not_dicom")
        instance(6, "rejected", reason="not_dicom")
        instance(7, "rejected", reason="body_part_not_chest", created_at=DAY2)
        instance(8, "failed", reason="model_error", created_at=DAY2)
        instance(9, "duplicate", created_at=DAY2)
        instance(10, "queued", created_at=DAY2)

        session.add(NormalizedImage(instance_id=i1.id, preprocessing_version="p1", png=b"", mean=120.5, std=60.25))
        for row, version, prob in ((i1, "v1", 0.9), (i2, "v1", 0.7), (i3, "v1", 0.2), (i4, "v1", 0.1), (i1, "v2", 0.4)):
            session.add(Prediction(instance_id=row.id, model_version=version, preprocessing_version="p1",
                                   probabilities={"covid": prob, "normal": 1 - prob}, prob_covid=prob,
                                   label="covid" if prob >= 0.5 else "normal", threshold=0.5, created_at=DAY1))
        for study, prob in zip(studies, (0.8, 0.2, 0.1), strict=False):
            session.add(StudyResult(study_id=study.id, model_version="v1", n_images=1, prob_covid=prob,
                                    label="covid" if prob >= 0.5 else "normal", rule="max", updated_at=DAY1))
        session.add_all([
            GroundTruthLabel(key_type="study_instance_uid", key_value="1.2.3.1", label="covid", source="rt-pcr",
                             label_date="2026-11-22"),
            GroundTruthLabel(key_type="sop_instance_uid", key_value="1.2.3.1.2", label="normal", source="radiologist",
                             label_date="2026-11-23"),
            GroundTruthLabel(key_type="accession_number", key_value="A2", label="normal", source="rt-pcr",
                             label_date="2026-11-22"),
            GroundTruthLabel(key_type="accession_number", key_value="A2", label="covid", source="radiologist",
                             label_date="2026-11-22"),
        ])
        session.add(EvaluationReport(
            window="24h", window_start=DAY1, window_end=DAY2, period="2026-11-21", model_version="v1", level="image",
            n=2, text_report="", flags=["drift_prob_covid"], created_at=DAY2,
            metrics={
                "performance": {
                    "counts": {"covid": 1, "normal": 1},
                    "accuracy": {"k": 1, "n": 2, "value": 0.5, "ci": [0.0945, 0.9055]},
                    "sensitivity": {"k": 1, "n": 1, "value": 1.0, "ci": [0.2065, 1.0]},
                    "specificity": {"k": 0, "n": 1, "value": 0.0, "ci": [0.0, 0.7935]},
                    "ppv": {"k": 1, "n": 2, "value": 0.5, "ci": [0.0945, 0.9055]},
                    "npv": {"k": 0, "n": 0, "value": None, "ci": None},
                    "f1": {"value": 0.6667, "ci": None},
                    "roc_auc": {"value": 1.0, "ci": None},
                    "brier": 0.25,
                },
                "drift": {"prob_covid": {"psi": 0.31}, "image_mean": {"psi": 0.05}, "image_std": {"psi": None}},
            },
        ))


def _rows(settings, sql: str) -> list[tuple]:
    engine = create_engine_for(settings)
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            # A session time zone far from UTC: days must still be UTC days.
            connection.exec_driver_sql("SET TIME ZONE 'America/New_York'")
        return [tuple(row) for row in connection.execute(sa.text(sql))]


def test_image_results_resolve_the_most_specific_label(db_settings):
    seed(db_settings)
    rows = _rows(db_settings, """
        SELECT model_version, sop_instance_uid, predicted_label, true_label, label_status, label_source,
               label_key_type, correct, outcome, image_mean, day
        FROM v_image_results ORDER BY model_version, sop_instance_uid""")
    day = "2026-11-20"
    assert rows == [
        ("v1", "1.2.3.1.1", "covid", "covid", "labelled", "rt-pcr", "study_instance_uid", 1, "TP", 120.5, day),
        ("v1", "1.2.3.1.2", "covid", "normal", "labelled", "radiologist", "sop_instance_uid", 0, "FP", None, day),
        ("v1", "1.2.3.2.3", "normal", None, "conflict", "several", "accession_number", None, None, None, day),
        ("v1", "1.2.3.3.4", "normal", None, None, None, None, None, None, None, day),
        ("v2", "1.2.3.1.1", "normal", "covid", "labelled", "rt-pcr", "study_instance_uid", 0, "FN", 120.5, day),
    ]


def test_study_results_take_study_labels_before_image_labels(db_settings):
    seed(db_settings)
    rows = _rows(db_settings, """
        SELECT study_instance_uid, predicted_label, true_label, label_status, outcome
        FROM v_study_results ORDER BY study_instance_uid""")
    assert rows == [
        ("1.2.3.1", "covid", "covid", "labelled", "TP"),
        ("1.2.3.2", "normal", None, "conflict", None),
        ("1.2.3.3", "normal", None, None, None),
    ]


def test_daily_volume_and_rejects_count_every_file_by_utc_day(db_settings):
    seed(db_settings)
    assert _rows(db_settings, "SELECT * FROM v_daily_volume ORDER BY day") == [
        ("2026-11-20", 5, 3, 2, 0, 0, 0),
        ("2026-11-21", 5, 1, 1, 1, 1, 1),
    ]
    assert _rows(db_settings, "SELECT * FROM v_daily_rejects ORDER BY day, state, reason") == [
        ("2026-11-20", "rejected", "not_dicom", 2),
        ("2026-11-21", "failed", "model_error", 1),
        ("2026-11-21", "rejected", "body_part_not_chest", 1),
    ]


def test_model_performance_unpacks_the_report_metrics(db_settings):
    seed(db_settings)
    (row,) = _rows(db_settings, """
        SELECT model_version, level, "window", period, n, n_covid, n_normal, accuracy, accuracy_low, accuracy_high,
               sensitivity, specificity, npv, npv_low, f1, roc_auc, roc_auc_low, brier, psi_prob_covid, psi_image_std,
               flags
        FROM v_model_performance""")
    assert row[:-1] == ("v1", "image", "24h", "2026-11-21", 2, 1, 1, 0.5, 0.0945, 0.9055,
                        1.0, 0.0, None, None, 0.6667, 1.0, None, 0.25, 0.31, None)
    assert row[-1].replace(" ", "") == '["drift_prob_covid"]'


def test_views_are_dropped_by_downgrade_and_recreated(db_settings):
    engine = create_engine_for(db_settings)
    with engine.begin() as connection:
        config = alembic_config(db_settings.database)
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    assert set(sa.inspect(engine).get_view_names()).isdisjoint(view.name for view in CURRENT_VIEWS)
    upgrade(db_settings)
    assert {view.name for view in CURRENT_VIEWS} <= set(sa.inspect(engine).get_view_names())


def test_sqlite_table_rebuild_in_a_later_migration_survives_the_views(tmp_path):
    """A batch-mode migration that rebuilds a table the views name must still run on SQLite."""
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_rebuild_instances.py").write_text(
        "from alembic import op\nimport sqlalchemy as sa\n"
        f"revision = '9999'\ndown_revision = {head_revision()!r}\nbranch_labels = None\ndepends_on = None\n"
        "def upgrade():\n"
        "    with op.batch_alter_table('instances', recreate='always') as batch:\n"
        "        batch.add_column(sa.Column('extra', sa.Integer()))\n"
        "def downgrade():\n    pass\n"
    )
    settings = load_settings(data_dir=tmp_path)
    upgrade(settings)
    config = alembic_config(settings.database)
    config.set_main_option("script_location", str(scripts))
    with create_engine_for(settings).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    seed(settings)
    assert len(_rows(settings, "SELECT * FROM v_image_results")) == 5


def _docs_analyst_queries() -> list[str]:
    """The ```sql blocks of the "Analyst queries" section of docs/sql.md."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "sql.md").read_text(encoding="utf-8")
    section = page.split("\n## Analyst queries\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def test_docs_analyst_queries_run_on_both_databases(db_settings):
    queries = _docs_analyst_queries()
    assert len(queries) >= 5
    seed(db_settings)
    for query in queries:
        _rows(db_settings, query.strip().rstrip(";"))
