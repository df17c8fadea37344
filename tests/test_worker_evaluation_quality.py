"""The evaluation leaves out images a quality check flagged (and their studies) unless asked, and counts them;
the analyst views expose the same facts on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from test_worker_evaluation import NOW, RECENT, seed

from covid_cxr.settings import load_settings
from db.migrate import upgrade
from db.models import Instance, QualityCheckRecord
from db.session import create_engine_for, session_scope
from service.cli import main
from worker.evaluation import run_evaluation


@pytest.fixture(autouse=True)
def fewer_bootstrap_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.evaluation_metrics.BOOTSTRAP_RESAMPLES", 100)


def _flagged_database(tmp_path, url: str | None = None):
    """The evaluation tests' database with v1's first case flagged and its second corrected."""
    settings = load_settings(data_dir=tmp_path, database_url=url)
    upgrade(settings)
    seed(settings)
    with session_scope(settings) as session:
        first, second = session.scalars(select(Instance).where(Instance.state == "predicted")
                                        .order_by(Instance.id).limit(2)).all()  # v1's covid 0.9 and 0.8 cases
        for instance, decision in ((first, "flag"), (second, "correct")):
            session.add(QualityCheckRecord(instance_id=instance.id, check_name="orientation", decision=decision,
                                           finding="upside_down", score=0.8, confident=decision == "correct",
                                           version="cxr-qc-1", created_at=instance.created_at))
    return settings


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request, tmp_path):
    return _flagged_database(tmp_path, request.getfixturevalue("postgres_url") if request.param == "postgresql"
                             else None)


def _v1_image(summaries):
    return next(s for s in summaries if s.model_version == "v1" and s.level == "image")


def test_flagged_images_are_left_out_unless_asked_and_counted(tmp_path):
    db_settings = _flagged_database(tmp_path)
    default = _v1_image(run_evaluation(db_settings, "24h", "v1", now=NOW))
    included = _v1_image(run_evaluation(db_settings, "24h", "v1", now=NOW, include_flagged=True))
    assert default.n == included.n - 1  # the flagged one; the corrected one stays in
    from worker.evaluation_store import latest_reports

    report = next(r for r in latest_reports(db_settings, "v1") if r.level == "image")
    assert report.metrics["quality"] == {"by_check": {"orientation": {"correct": 1, "flag": 1}}, "flagged": 1,
                                         "flagged_included": True}
    run_evaluation(db_settings, "24h", "v1", now=NOW)
    report = next(r for r in latest_reports(db_settings, "v1") if r.level == "image")
    assert "quality checks: 1 flagged images left out of the metrics" in report.text_report
    assert "  orientation: correct 1, flag 1" in report.text_report
    study = next(r for r in latest_reports(db_settings, "v1") if r.level == "study")
    assert "1 studies with a flagged image left out" in study.text_report


def test_the_views_say_which_results_were_flagged(db_settings):
    with create_engine_for(db_settings).connect() as connection:
        images = connection.execute(sa.text(
            "SELECT quality_flagged, quality_corrected, COUNT(*) FROM v_image_results "
            "GROUP BY quality_flagged, quality_corrected ORDER BY 1, 2")).all()
        studies = connection.execute(sa.text(
            "SELECT COUNT(*) FROM v_study_results WHERE quality_flagged = 1")).scalar_one()
        daily = connection.execute(sa.text(
            "SELECT day, check_name, decision, finding, version, n FROM v_daily_quality ORDER BY decision")).all()
    assert [tuple(row) for row in images] == [(0, 0, 11), (0, 1, 1), (1, 0, 1)]
    assert studies == 1
    day = RECENT.date().isoformat()
    assert [tuple(row) for row in daily] == [(day, "orientation", "correct", "upside_down", "cxr-qc-1", 1),
                                             (day, "orientation", "flag", "upside_down", "cxr-qc-1", 1)]


def test_cli_evaluate_include_flagged(tmp_path, capsys):
    _flagged_database(tmp_path)
    argv = ["evaluate", "--window", "all", "--model", "v1", "--data-dir", str(tmp_path)]
    assert main(argv) == 0
    default = capsys.readouterr().out
    assert main([*argv, "--include-flagged"]) == 0
    included = capsys.readouterr().out
    assert "v1 image all" in default and default != included
