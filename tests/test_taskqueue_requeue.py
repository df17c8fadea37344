"""``covid-cxr requeue``: failed instances start afresh and are sent through the producer; filters and dry runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from service_fixtures import embedded_settings, record_instances
from sqlalchemy import select, update

from db.migrate import upgrade
from db.models import Instance
from db.session import session_scope
from service.cli import main
from taskqueue.recovery import waiting_batch_ids

IMAGES = [np.full((224, 224), level, dtype=np.uint8) for level in (10, 60, 120, 180, 240)]


@pytest.fixture
def installation(tmp_path):
    """Five failed instances: three without a model (one of them failed long ago), two with an inference error."""
    settings = embedded_settings(tmp_path)
    upgrade(settings)
    ids = record_instances(settings, IMAGES, preprocessing_version="test")
    long_ago = datetime.now(UTC) - timedelta(days=3)
    with session_scope(settings) as session:
        for instance_id, reason in zip(ids, ["no_active_model"] * 3 + ["inference_error"] * 2, strict=True):
            session.execute(update(Instance).where(Instance.id == instance_id).values(
                state="failed", reason=reason, message=f"{reason} happened", attempts=3, finished_at=long_ago))
        session.execute(update(Instance).where(Instance.id == ids[0]).values(updated_at=long_ago))
    return settings, ids


def _rows(settings, ids) -> dict[int, Instance]:
    with session_scope(settings) as session:
        return {row.id: row for row in session.scalars(select(Instance).where(Instance.id.in_(ids)))}


def test_a_dry_run_shows_the_selection_and_changes_nothing(installation, capsys):
    settings, ids = installation
    assert main(["requeue", "--data-dir", str(settings.data_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 failed instance(s) (no_active_model 3, inference_error 2)" in out
    assert "nothing changed" in out
    assert {row.state for row in _rows(settings, ids).values()} == {"failed"}
    assert waiting_batch_ids(settings) == set()


def test_failed_instances_of_one_reason_since_a_time_start_afresh_and_are_sent(installation, capsys):
    settings, ids = installation
    assert main(["requeue", "--data-dir", str(settings.data_dir), "--reason", "no_active_model",
                 "--since", "1d"]) == 0
    out = capsys.readouterr().out
    assert "selected     2 failed instance(s) (no_active_model 2)" in out
    assert "sent         2 in 1 batch(es) to queue gpu" in out
    rows = _rows(settings, ids)
    for instance_id in ids[1:3]:
        row = rows[instance_id]
        assert (row.state, row.attempts, row.reason, row.message, row.finished_at) == ("queued", 0, None, None, None)
    assert waiting_batch_ids(settings) == {rows[ids[1]].batch_id}
    assert rows[ids[0]].state == "failed", "failed before --since"
    assert {rows[i].reason for i in ids[3:]} == {"inference_error"} and {rows[i].state for i in ids[3:]} == {"failed"}


def test_queued_instances_are_sent_again_as_they_are(installation, capsys):
    settings, ids = installation
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id.in_(ids[3:])).values(
            state="queued", reason=None, attempts=1, batch_id="lost-batch"))
    assert main(["requeue", "--data-dir", str(settings.data_dir), "--state", "queued"]) == 0
    rows = _rows(settings, ids[3:])
    assert {row.attempts for row in rows.values()} == {1}, "a queued instance keeps its attempts"
    assert {row.batch_id for row in rows.values()} != {"lost-batch"}
    assert waiting_batch_ids(settings) == {row.batch_id for row in rows.values()}


def test_a_bad_since_is_a_usage_error(installation, capsys):
    settings, _ = installation
    with pytest.raises(SystemExit) as exit_info:
        main(["requeue", "--data-dir", str(settings.data_dir), "--since", "yesterday"])
    assert exit_info.value.code == 2
    assert "neither a duration" in capsys.readouterr().err
