"""``covid-cxr status`` and ``results`` on a populated database (SQLite + folder broker, PostgreSQL + Redis)."""

from __future__ import annotations

import csv
import io
import json
import socket

import numpy as np
import pytest
from service_fixtures import embedded_settings, record_instances
from sqlalchemy import update

from covid_cxr.commandline import EXIT_USAGE
from covid_cxr.reasons import Reason
from db.migrate import upgrade
from db.models import Instance, ModelVersion
from db.session import session_scope
from service.cli import main
from taskqueue.producer import enqueue_batch
from worker.cli import format_status
from worker.inference import LoadedModel
from worker.results import IMAGE_COLUMNS
from worker.tasks import claim_instances, fail_instances, store_predictions

IMAGES = [np.full((224, 224), level, dtype=np.uint8) for level in (30, 90, 150, 210)]


@pytest.fixture
def settings(backend_settings):
    return backend_settings


def _flags(settings) -> list[str]:
    flags = ["--data-dir", str(settings.data_dir)]
    if settings.database_url:
        flags += ["--database-url", settings.database_url, "--broker-url", settings.broker_url]
    return flags


def _populate(settings) -> dict[str, list[int]]:
    """Two predicted studies, one failed image, one rejected file, one image waiting in the queue."""
    with session_scope(settings) as session:
        session.add(ModelVersion(name=settings.model_name, version="v-test", sha256="ab" * 32, active=True,
                                 metadata_json={"decision_threshold": 0.4, "preprocessing_version": "test"},
                                 artifact=b"not a real model"))
    model = LoadedModel(model=None, model_id=None, name=settings.model_name, version="v-test", sha256="ab" * 32,
                        threshold=0.4, class_names=("covid", "normal"), positive_class="covid",
                        preprocessing_version="test")
    first = record_instances(settings, IMAGES[:2], study_uid="1.2.3.1", view_positions=["PA", "LL"],
                             preprocessing_version="test")
    second = record_instances(settings, IMAGES[2:3], study_uid="1.2.3.2", preprocessing_version="test")
    for ids, covid in ((first, [0.3, 0.9]), (second, [0.45])):
        claimed, _ = claim_instances(settings, ids)
        store_predictions(settings, model, "b", claimed, np.array([[p, 1 - p] for p in covid]), 100.0)
    failed = record_instances(settings, IMAGES[3:], preprocessing_version="test")
    fail_instances(settings, {failed[0]: ("corrupt_image", "the stored normalized image is not a decodable PNG")})
    rejected = record_instances(settings, [b"x"], preprocessing_version="test")
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id == rejected[0])
                        .values(state="rejected", reason="not_chest", message="BodyPartExamined is HAND"))
    waiting = record_instances(settings, IMAGES[:1], preprocessing_version="test")
    assert enqueue_batch(settings, waiting)
    return {"first": first, "second": second, "failed": failed, "rejected": rejected, "waiting": waiting}


def test_status_json_reports_counts_queue_model_and_errors(settings, capsys):
    ids = _populate(settings)
    assert main(["status", "--json", *_flags(settings)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["instances"] == {"received": 0, "queued": 1, "predicted": 3, "rejected": 1, "duplicate": 0,
                                   "failed": 1, "total": 6}
    assert (status["predictions"], status["studies"]) == (3, 5)
    assert status["queues"] == {"gpu": 1, "cpu": 0} and status["queue_error"] is None
    assert status["active_model"]["version"] == "v-test" and status["active_model"]["decision_threshold"] == 0.4
    assert status["last_error"]["instance_id"] == ids["failed"][0]
    assert status["last_error"]["reason"] == "corrupt_image" and "PNG" in status["last_error"]["message"]
    assert status["last_error"]["reason_description"] == Reason.CORRUPT_IMAGE.description
    assert status["last_rejection"]["reason"] == "not_chest"
    assert status["last_rejection"]["reason_description"] is None  # not a code of this release
    assert status["oldest_pending"]["instance_id"] == ids["waiting"][0]


def test_status_text_and_an_unreachable_broker(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    settings = embedded_settings(tmp_path, broker_url=f"redis://127.0.0.1:{closed}/0")
    upgrade(settings)
    assert main(["status", "--data-dir", str(tmp_path), "--broker-url", settings.broker_url]) == 0
    out = capsys.readouterr().out
    assert "queue depth  broker unreachable" in out
    assert "model        none active" in out and "covid-cxr models import" in out
    assert "instances    received 0" in out


def test_status_text_describes_each_reason_code_it_shows():
    problem = {"at": "2026-01-02T03:04:05+00:00", "instance_id": 7, "state": "failed", "attempts": 3,
               "reason": "worker_lost", "reason_description": Reason.WORKER_LOST.description, "message": "gave up"}
    report = {"database": "sqlite://", "broker": "redis://", "instances": {"failed": 1, "total": 1},
              "predictions": 0, "studies": 0, "queue_error": None, "queues": {"gpu": 0}, "active_model": None,
              "last_error": problem, "last_rejection": {**problem, "reason": "not_chest", "reason_description": None},
              "oldest_pending": None}
    lines = format_status(report).splitlines()
    error = lines.index("last error   2026-01-02T03:04:05+00:00 instance 7 (failed, attempts 3) worker_lost: gave up")
    assert lines[error + 1] == f"             worker_lost means: {Reason.WORKER_LOST.description}"
    assert lines[error + 2].endswith("not_chest: gave up") and lines[error + 2].startswith("last reject  ")
    assert lines[error + 3:] == ["stuck files  none"]


def test_a_bad_limit_is_a_usage_error(tmp_path, capsys):
    assert main(["results", "--limit", "0", "--data-dir", str(tmp_path)]) == EXIT_USAGE
    assert "--limit must be at least 1 [usage]" in capsys.readouterr().err


def test_status_refuses_an_out_of_date_schema(tmp_path, capsys):
    assert main(["status", "--data-dir", str(tmp_path)]) == 1
    assert "covid-cxr db upgrade" in capsys.readouterr().err


def test_results_json_lists_studies_and_images_newest_first(settings, capsys):
    ids = _populate(settings)
    assert main(["results", "--format", "json", *_flags(settings)]) == 0
    results = json.loads(capsys.readouterr().out)
    studies = {row["study_instance_uid"]: row for row in results["studies"]}
    assert set(studies) == {"1.2.3.1", "1.2.3.2"}
    # Study 1: the lateral (0.9) does not count; the PA image (0.3) is below the 0.4 threshold.
    assert (studies["1.2.3.1"]["prob_covid"], studies["1.2.3.1"]["label"], studies["1.2.3.1"]["n_images"]) == (
        pytest.approx(0.3), "normal", 1)
    assert (studies["1.2.3.2"]["label"], studies["1.2.3.2"]["rule"]) == ("covid", "max_frontal")
    images = results["images"]
    assert [row["instance_id"] for row in images] == sorted(sum(ids.values(), []), reverse=True)
    by_id = {row["instance_id"]: row for row in images}
    lateral = by_id[ids["first"][1]]
    assert (lateral["state"], lateral["label"], lateral["study_label"]) == ("predicted", "covid", "normal")
    assert by_id[ids["failed"][0]]["reason"] == "corrupt_image" and by_id[ids["failed"][0]]["prob_covid"] is None
    assert "patient_pseudonym" not in json.dumps(results)

    assert main(["results", "--format", "json", "--study", "1.2.3.2", "--limit", "5", *_flags(settings)]) == 0
    one = json.loads(capsys.readouterr().out)
    assert [row["instance_id"] for row in one["images"]] == ids["second"]
    assert [row["study_instance_uid"] for row in one["studies"]] == ["1.2.3.2"]


def test_results_csv_and_table(tmp_path, capsys):
    settings = embedded_settings(tmp_path)
    upgrade(settings)
    _populate(settings)
    assert main(["results", "--format", "csv", "--limit", "3", "--data-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and list(rows[0]) == list(IMAGE_COLUMNS)
    assert main(["results", "--data-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("Studies\nstudy_instance_uid") and "\nImages\ninstance_id" in table
    assert "0.450" in table


def test_header_values_and_file_names_cannot_drive_a_terminal_or_a_spreadsheet(tmp_path, capsys):
    settings = embedded_settings(tmp_path)
    upgrade(settings)
    ids = _populate(settings)
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id == ids["rejected"][0])
                        .values(message="Modality is \x1b]0;owned\x07\x1b[2J"))
        session.execute(update(Instance).where(Instance.id == ids["second"][0])
                        .values(view_position="@SUM(1+1)", file_name='=HYPERLINK("http://x")\nforged'))
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    status = capsys.readouterr().out
    assert "\x1b" not in status and "\x07" not in status
    assert "Modality is \\x1b]0;owned\\x07\\x1b[2J" in status
    assert main(["results", "--format", "csv", "--data-dir", str(tmp_path)]) == 0
    rows = {int(row["instance_id"]): row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    hostile = rows[ids["second"][0]]
    assert hostile["view_position"] == "'@SUM(1+1)"
    assert hostile["file_name"] == "'=HYPERLINK(\"http://x\")\\x0aforged"
    assert main(["results", "--data-dir", str(tmp_path)]) == 0
    assert "\x1b" not in capsys.readouterr().out


def test_status_lists_stuck_inbox_entries_with_their_cause(tmp_path, capsys):
    from ingest.stuck import mark_stuck

    settings = embedded_settings(tmp_path)
    upgrade(settings)
    mark_stuck(settings, "link.dcm", Reason.NOT_A_REGULAR_FILE, "a symbolic link: links are never followed", 3)
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stuck files  1" in out
    assert "  link.dcm: not_a_regular_file for " in out and "(3 attempt(s)): a symbolic link" in out
    assert main(["status", "--json", "--data-dir", str(tmp_path)]) == 0
    [entry] = json.loads(capsys.readouterr().out)["stuck_files"]
    assert (entry["file_name"], entry["cause"], entry["attempts"]) == ("link.dcm", "not_a_regular_file", 3)
