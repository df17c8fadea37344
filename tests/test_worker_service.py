"""Real ``covid-cxr worker`` processes: embedded (filesystem broker + SQLite) and distributed (Redis + PostgreSQL).

Killed workers, retries that run out, and a pickled message the worker must refuse.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest
from service_fixtures import (
    FORWARD_PASS_STARTED,
    MODEL_LOADED,
    WORKER_READY,
    chest_images,
    distributed_settings,
    embedded_settings,
    instance_states,
    prediction_counts,
    record_instances,
    start_worker,
    wait_until,
)
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Instance
from db.session import session_scope
from taskqueue.names import PREDICT_TASK
from taskqueue.producer import enqueue_batch

pytestmark = pytest.mark.slow

#: A model load plus a few forward passes on two shared cores.
PREDICTED_TIMEOUT = 180


@pytest.fixture(scope="module")
def images(cxr_dir):
    return chest_images(cxr_dir, 6)


def _instances(settings, ids):
    with session_scope(settings) as session:
        return {row.id: row for row in session.scalars(select(Instance).where(Instance.id.in_(ids)))}


def _all_in(settings, ids, state):
    return set(instance_states(settings, ids).values()) == {state}


def test_embedded_worker_predicts_a_batch_in_one_forward_pass(tmp_path, active_model, images):
    settings = embedded_settings(tmp_path)
    model = active_model.register(settings)
    ids = record_instances(settings, images[:3])
    # A message file that is not a message (kombu's own transport stops the worker on one of these).
    (settings.broker_dir / "queue").mkdir(parents=True)
    (settings.broker_dir / "queue" / f"0_garbage.{settings.inference_queue}.msg").write_bytes(b"")
    assert enqueue_batch(settings, ids)
    with start_worker(settings) as worker:
        wait_until(lambda: _all_in(settings, ids, "predicted"), timeout=PREDICTED_TIMEOUT, what="predictions")
    assert prediction_counts(settings, ids) == {i: 1 for i in ids}
    log = worker.log_text()
    assert "dropped an unreadable message file from queue gpu" in log
    assert not list((settings.broker_dir / "queue").iterdir())
    assert log.count(FORWARD_PASS_STARTED) == 1 and f"running model {model.version} on 3 image(s)" in log
    assert worker.process.returncode == 0  # SIGTERM is a clean, warm shutdown


class _RunsCodeWhenUnpickled:
    """What an attacker with access to the broker would send if the workers accepted pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_redis_worker_refuses_a_pickled_message_and_serves_json(tmp_path, active_model, images, postgres_url,
                                                                 redis_url):
    from kombu import Connection, Exchange, Producer, Queue

    settings = distributed_settings(tmp_path, postgres_url, redis_url)
    active_model.register(settings)
    marker = tmp_path / "pwned"
    with start_worker(settings) as worker:
        task_id = str(uuid.uuid4())
        queue = Queue(settings.inference_queue, Exchange(settings.inference_queue, type="direct"),
                      routing_key=settings.inference_queue)
        with Connection(redis_url) as connection:
            Producer(connection.default_channel).publish(
                ((), {"instance_ids": [1], "batch_id": _RunsCodeWhenUnpickled(marker)}, {}),
                serializer="pickle", exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                headers={"task": PREDICT_TASK, "id": task_id, "lang": "py", "retries": 0, "root_id": task_id},
            )
        wait_until(lambda: "ContentDisallowed" in worker.log_text(), timeout=60, what="the refusal in the log")
        ids = record_instances(settings, images[:2])
        assert enqueue_batch(settings, ids)
        wait_until(lambda: _all_in(settings, ids, "predicted"), timeout=PREDICTED_TIMEOUT, what="predictions")
        import redis

        assert redis.Redis.from_url(redis_url).llen(settings.inference_queue) == 0  # dropped, not requeued
    assert not marker.exists()
    assert "Refusing to deserialize untrusted content of type pickle" in worker.log_text()
    assert prediction_counts(settings, ids) == {i: 1 for i in ids}


def test_redis_batch_of_a_killed_worker_is_redelivered_and_predicted_once(tmp_path, active_model, images,
                                                                           postgres_url, redis_url):
    # requeue_after_seconds is also the Redis visibility timeout: a dead worker's batch comes back after it.
    settings = distributed_settings(tmp_path, postgres_url, redis_url, requeue_after_seconds=8)
    active_model.register(settings)
    ids = record_instances(settings, images)
    with start_worker(settings, wait_for=(WORKER_READY, MODEL_LOADED), log_path=tmp_path / "first.log") as first:
        assert enqueue_batch(settings, ids)
        first.wait_for_log(FORWARD_PASS_STARTED, timeout=60)
        first.kill()
    assert prediction_counts(settings, ids) == {i: 0 for i in ids}, "killed too late: the batch had been written"
    assert _all_in(settings, ids, "queued")
    with start_worker(settings, log_path=tmp_path / "second.log") as second:
        wait_until(lambda: _all_in(settings, ids, "predicted"), timeout=PREDICTED_TIMEOUT, what="redelivery")
    assert prediction_counts(settings, ids) == {i: 1 for i in ids}
    assert {row.attempts for row in _instances(settings, ids).values()} == {2}
    assert FORWARD_PASS_STARTED in second.log_text()


def _pool_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def test_embedded_pool_process_killed_mid_batch_is_rejected_back_and_predicted_once(tmp_path, active_model,
                                                                                     images):
    settings = embedded_settings(tmp_path)
    active_model.register(settings)
    ids = record_instances(settings, images)
    with start_worker(settings, wait_for=(WORKER_READY, MODEL_LOADED)) as worker:
        assert enqueue_batch(settings, ids)
        worker.wait_for_log(FORWARD_PASS_STARTED, timeout=60)
        (child,) = _pool_children(worker.process.pid)
        os.kill(child, signal.SIGKILL)
        # task_reject_on_worker_lost puts the message back; a new pool process loads the model and runs it.
        wait_until(lambda: _all_in(settings, ids, "predicted"), timeout=PREDICTED_TIMEOUT, what="the retry")
    assert prediction_counts(settings, ids) == {i: 1 for i in ids}
    assert {row.attempts for row in _instances(settings, ids).values()} == {2}
    log = worker.log_text()
    assert "WorkerLostError" in log and log.count(FORWARD_PASS_STARTED) == 2


def test_a_batch_that_keeps_failing_ends_failed_with_its_error(tmp_path, images):
    settings = embedded_settings(tmp_path, max_attempts=2)
    upgrade(settings)  # and no model registered at all
    ids = record_instances(settings, images[:2])
    assert enqueue_batch(settings, ids)
    with start_worker(settings) as worker:
        wait_until(lambda: _all_in(settings, ids, "failed"), timeout=60, what="the batch to fail")
    rows = _instances(settings, ids).values()
    assert {(row.reason, row.attempts) for row in rows} == {("no_active_model", 2)}
    assert all("covid-cxr models import" in row.message and row.finished_at for row in rows)
    log = worker.log_text()
    assert "retrying 2 instance(s) in 1 s" in log and "failed for good after 2 attempt(s)" in log
    assert prediction_counts(settings, ids) == {i: 0 for i in ids}
