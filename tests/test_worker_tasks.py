"""One inference attempt in-process with the real Keras VGG16: predictions, idempotence, study rule, failures."""

from __future__ import annotations

import numpy as np
import pytest
from service_fixtures import (
    chest_images,
    distributed_settings,
    embedded_settings,
    instance_states,
    prediction_counts,
    record_instances,
)
from sqlalchemy import select, update

from covid_cxr.reasons import Reason
from db.migrate import upgrade
from db.models import Instance, Prediction, StudyResult
from db.session import session_scope
from model_store.architecture import to_model_input
from worker.inference import ActiveModelCache
from worker.tasks import (
    RULE_MAX_FRONTAL,
    RULE_MAX_VIEW_UNKNOWN,
    AttemptFailed,
    aggregate_study,
    claim_instances,
    record_attempt_failure,
    run_batch,
    store_predictions,
)

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request, tmp_path):
    if request.param == "sqlite":
        return embedded_settings(tmp_path)
    return distributed_settings(tmp_path, request.getfixturevalue("postgres_url"), "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="module")
def images(cxr_dir):
    return chest_images(cxr_dir, 4)


def test_study_rule_is_the_maximum_over_frontal_views():
    assert aggregate_study([("PA", 0.2), ("ap", 0.7), ("LL", 0.99), (None, 0.9)]) == (
        aggregate_study([("AP", 0.7), ("PA", 0.2)]))
    frontal = aggregate_study([("PA", 0.2), ("AP", 0.7), ("LL", 0.99)])
    assert (frontal.n_images, frontal.prob_covid, frontal.rule) == (2, 0.7, RULE_MAX_FRONTAL)
    unknown = aggregate_study([(None, 0.3), ("", 0.6), ("LL", 0.99)])
    assert (unknown.n_images, unknown.prob_covid, unknown.rule) == (2, 0.6, RULE_MAX_VIEW_UNKNOWN)
    assert aggregate_study([("LL", 0.9)]) is None
    assert aggregate_study([]) is None


def test_a_batch_is_predicted_once_with_provenance_and_a_study_result(db_settings, active_model, images):
    record = active_model.register(db_settings)
    ids = record_instances(db_settings, images, view_positions=["PA", "AP", "LL", "PA"], state="queued")
    models = ActiveModelCache()

    report = run_batch(db_settings, ids, "batch-1", models=models)
    assert (report.predicted, report.skipped, report.failed) == (4, 0, {})
    assert report.model_version == record.version and report.forward_ms > 0
    with session_scope(db_settings) as session:
        rows = session.scalars(select(Prediction).where(Prediction.instance_id.in_(ids))
                               .order_by(Prediction.instance_id)).all()
        instances = session.scalars(select(Instance).where(Instance.id.in_(ids))).all()
        study = session.scalars(select(StudyResult)).one()
    assert [row.instance_id for row in rows] == ids
    for row in rows:
        assert row.model_version == record.version and row.model_id == record.id
        assert row.preprocessing_version == record.metadata_json["preprocessing_version"]
        assert set(row.probabilities) == {"covid", "normal"}
        assert sum(row.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert row.prob_covid == row.probabilities["covid"]
        assert row.label == ("covid" if row.prob_covid >= 0.5 else "normal") and row.threshold == 0.5
        assert (row.batch_id, row.batch_size) == ("batch-1", 4)
        assert row.inference_ms == pytest.approx(report.forward_ms / 4)
        assert row.queued_ms > 0
    assert {i.state for i in instances} == {"predicted"} and all(i.finished_at for i in instances)
    assert {i.attempts for i in instances} == {1}
    frontal = [row.prob_covid for row in rows if row.instance_id != ids[2]]  # ids[2] is the lateral
    assert (study.n_images, study.rule, study.model_version) == (3, RULE_MAX_FRONTAL, record.version)
    assert study.prob_covid == pytest.approx(max(frontal))

    again = run_batch(db_settings, ids, "batch-1", models=models)  # a redelivered message
    assert (again.predicted, again.skipped) == (0, 4)
    assert prediction_counts(db_settings, ids) == {i: 1 for i in ids}


def test_two_deliveries_writing_the_same_batch_keep_one_row_per_image(db_settings, active_model, images):
    active_model.register(db_settings)
    ids = record_instances(db_settings, images[:2], state="queued")
    model = ActiveModelCache().get(db_settings)
    claimed_by_first, _ = claim_instances(db_settings, ids)
    claimed_by_second, _ = claim_instances(db_settings, ids)  # both claimed before either wrote
    probabilities = model.probabilities(np.stack(images[:2]))
    assert model.forward is not None  # the compiled function gives what the Keras model gives
    eager = model.model(to_model_input(np.stack(images[:2])), training=False)
    assert np.allclose(probabilities, np.asarray(eager), atol=1e-5)
    store_predictions(db_settings, model, "first", claimed_by_first, probabilities, 10.0)
    store_predictions(db_settings, model, "second", claimed_by_second, probabilities, 20.0)
    assert prediction_counts(db_settings, ids) == {i: 1 for i in ids}
    with session_scope(db_settings) as session:
        assert set(session.scalars(select(Prediction.batch_id))) == {"first"}


def test_an_undecodable_or_mismatched_image_fails_alone(tmp_path, active_model, images):
    settings = embedded_settings(tmp_path)
    active_model.register(settings)
    good = record_instances(settings, images[:2])
    corrupt = record_instances(settings, [b"\x89PNG\r\n\x1a\n truncated"])
    old = record_instances(settings, images[2:3], preprocessing_version="cxr-norm-0")
    report = run_batch(settings, good + corrupt + old, "mixed", models=ActiveModelCache())
    assert report.predicted == 2
    assert report.failed == {Reason.CORRUPT_IMAGE: 1, Reason.PREPROCESSING_MISMATCH: 1}
    with session_scope(settings) as session:
        rows = {i.id: i for i in session.scalars(select(Instance))}
    assert [rows[i].state for i in good] == ["predicted", "predicted"]
    assert (rows[corrupt[0]].state, rows[corrupt[0]].reason) == ("failed", Reason.CORRUPT_IMAGE)
    assert "PNG" in rows[corrupt[0]].message
    assert (rows[old[0]].state, rows[old[0]].reason) == ("failed", Reason.PREPROCESSING_MISMATCH)
    assert "cxr-norm-0" in rows[old[0]].message


def test_without_an_active_model_attempts_are_counted_then_the_batch_fails(db_settings, images):
    settings = db_settings.model_copy(update={"max_attempts": 2})
    upgrade(settings)
    ids = record_instances(settings, images[:2], state="queued")
    for attempt, expected_state in ((1, "queued"), (2, "failed")):
        with pytest.raises(AttemptFailed) as failed:
            run_batch(settings, ids, "no-model", models=ActiveModelCache())
        assert failed.value.reason == "no_active_model"
        again = record_attempt_failure(settings, failed.value)
        assert again == (ids if expected_state == "queued" else [])
        with session_scope(settings) as session:
            rows = session.scalars(select(Instance).where(Instance.id.in_(ids))).all()
        assert {(r.state, r.reason, r.attempts) for r in rows} == {(expected_state, "no_active_model", attempt)}
        assert "covid-cxr models import" in rows[0].message
    assert prediction_counts(settings, ids) == {i: 0 for i in ids}


def test_non_finite_probabilities_store_nothing_and_fail_the_attempt(tmp_path, active_model, images):
    """A forward pass that gives NaN (seen with bf16 under XLA on the CPU) must never reach the results table."""
    settings = embedded_settings(tmp_path)
    active_model.register(settings)
    ids = record_instances(settings, images[:2], state="queued")
    cache = ActiveModelCache()
    model = cache.get(settings)
    real_forward = model.forward

    def half_nan(x):
        out = np.array(real_forward(x), dtype=np.float64)
        out[0] = np.nan
        return out

    model.forward = half_nan
    with pytest.raises(AttemptFailed) as failed:
        run_batch(settings, ids, "nan", models=cache)
    assert failed.value.reason == Reason.NON_FINITE_SCORES
    assert "1 of 2 image(s)" in failed.value.message
    assert prediction_counts(settings, ids) == {i: 0 for i in ids}


def test_an_instance_whose_attempts_all_died_is_given_up(tmp_path, images):
    settings = embedded_settings(tmp_path, max_attempts=2)
    upgrade(settings)
    (dying,) = record_instances(settings, images[:1], state="queued")
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id == dying).values(attempts=2))
    report = run_batch(settings, [dying], "poison", models=ActiveModelCache())
    assert report.failed == {Reason.WORKER_LOST: 1}
    assert instance_states(settings, [dying]) == {dying: "failed"}
