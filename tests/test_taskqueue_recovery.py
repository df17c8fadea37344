"""Lost batches are told from waiting and running ones, on the folder broker and on a real Redis.

A batch whose message still waits in the queue is never lost; one whose message is gone is lost once
it has been quiet for ``batch_timeout_seconds``; a worker's heartbeat keeps a running batch alive.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from service_fixtures import distributed_settings, embedded_settings, instance_states, record_instances
from sqlalchemy import select, update

from db.migrate import upgrade
from db.models import Instance
from db.session import session_scope
from taskqueue.producer import enqueue_batch, requeue_stale
from taskqueue.recovery import lost_instance_ids, overdue_summary, waiting_batch_ids
from worker.heartbeat import heartbeat

IMAGES = [np.full((224, 224), level, dtype=np.uint8) for level in (10, 120, 240)]


@pytest.fixture
def settings(backend_settings):
    return backend_settings.model_copy(update={"batch_timeout_seconds": 60.0})


def _batch_ids(settings, ids) -> set[str]:
    with session_scope(settings) as session:
        return set(session.scalars(select(Instance.batch_id).where(Instance.id.in_(ids))))


def _quiet_for(settings, ids, seconds: float) -> None:
    """As if nothing had happened to these rows for ``seconds``."""
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id.in_(ids))
                        .values(updated_at=datetime.now(UTC) - timedelta(seconds=seconds)))


def _take_every_message(settings) -> None:
    """What a worker does when it takes a message: it is no longer in the queue."""
    if settings.embedded_broker:
        for path in (settings.broker_dir / "queue").glob(f"*.{settings.inference_queue}.msg"):
            path.unlink()
    else:
        import redis

        redis.Redis.from_url(settings.broker).delete(settings.inference_queue)


def test_a_batch_waiting_in_the_queue_is_never_lost_however_old(settings):
    ids = record_instances(settings, IMAGES, preprocessing_version="test")
    assert enqueue_batch(settings, ids)
    (batch_id,) = _batch_ids(settings, ids)
    assert waiting_batch_ids(settings) == {batch_id}, "the task id is the batch id"
    _quiet_for(settings, ids, 3600)
    assert lost_instance_ids(settings) == []
    assert overdue_summary(settings)["instances"] == 3, "it is overdue all the same: it waits longer than expected"


def test_a_quiet_batch_in_no_queue_is_lost_and_requeue_stale_sends_it_again(settings):
    ids = record_instances(settings, IMAGES, preprocessing_version="test")
    assert enqueue_batch(settings, ids)
    (first,) = _batch_ids(settings, ids)
    _take_every_message(settings)
    assert lost_instance_ids(settings) == [], "taken a moment ago: a worker may be starting on it"
    _quiet_for(settings, ids, 61)
    assert lost_instance_ids(settings) == sorted(ids)
    assert requeue_stale(settings) == 3  # well before requeue_after_seconds (900 s)
    (second,) = _batch_ids(settings, ids)
    assert second != first and waiting_batch_ids(settings) == {second}
    assert set(instance_states(settings, ids).values()) == {"queued"}
    assert lost_instance_ids(settings) == [] and overdue_summary(settings)["instances"] == 0


def test_a_worker_heartbeat_keeps_a_long_batch_alive(settings):
    ids = record_instances(settings, IMAGES, preprocessing_version="test")
    assert enqueue_batch(settings, ids)
    _take_every_message(settings)
    _quiet_for(settings, ids, 61)
    with heartbeat(settings, ids, interval=0.1):
        time.sleep(0.5)
        assert lost_instance_ids(settings) == [], "the worker holding it is alive"
    time.sleep(0.5)
    assert lost_instance_ids(settings, quiet_seconds=0.3) == sorted(ids), "quiet once the heartbeat stops"


def test_the_folder_broker_skips_half_written_and_foreign_files(tmp_path):
    settings = embedded_settings(tmp_path)
    upgrade(settings)
    queue = settings.broker_dir / "queue"
    queue.mkdir(parents=True, exist_ok=True)
    (queue / f".1_x.{settings.inference_queue}.msg.partial").write_text("{")
    (queue / f"2_y.{settings.inference_queue}.msg").write_text("not json")
    (queue / f"3_z.{settings.cpu_queue}.msg").write_text('{"headers": {"id": "other-queue"}}')
    assert waiting_batch_ids(settings) == set()


def test_a_redis_message_a_worker_took_lately_is_in_hand_and_one_taken_long_ago_is_not(tmp_path, postgres_url,
                                                                                       redis_url):
    """A worker whose pool is still loading the model holds its message unacknowledged, with no sign in the rows."""
    import redis

    from taskqueue.producer import producer_app

    settings = distributed_settings(tmp_path, postgres_url, redis_url, batch_timeout_seconds=60.0)
    upgrade(settings)
    ids = record_instances(settings, IMAGES, preprocessing_version="test")
    assert enqueue_batch(settings, ids)
    (batch_id,) = _batch_ids(settings, ids)
    _quiet_for(settings, ids, 61)
    with producer_app(settings).connection_for_read() as connection:
        held = connection.SimpleQueue(settings.inference_queue, no_ack=False).get(timeout=5)  # taken, not acked
        assert waiting_batch_ids(settings) == set(), "no longer in the queue's list"
        assert waiting_batch_ids(settings, taken_within_seconds=60) == {batch_id}
        assert lost_instance_ids(settings) == [], "taken a moment ago by a worker that is alive"
        client = redis.Redis.from_url(redis_url)
        (tag,) = client.zrange("unacked_index", 0, -1)
        client.zadd("unacked_index", {tag: time.time() - 120})  # as if taken two minutes ago by a worker now dead
        assert lost_instance_ids(settings) == sorted(ids)
        held.requeue()
