"""Publishing batches (filesystem broker, real Redis, a dead broker) and re-enqueueing what was lost."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from service_fixtures import embedded_settings, instance_states, record_instances
from sqlalchemy import select, update

from db.migrate import upgrade
from db.models import Instance
from db.session import session_scope
from taskqueue.names import PREDICT_TASK
from taskqueue.producer import enqueue_batch, prepare_producer, producer_app, requeue_stale

IMAGES = [np.full((224, 224), level, dtype=np.uint8) for level in (10, 120, 240)]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def settings(backend_settings):
    return backend_settings


def _wait_for_broker_uptime(settings, seconds: float) -> None:
    """Until the broker has been up ``seconds`` (no-op for the folder broker, whose start time is unknown)."""
    from taskqueue.recovery import broker_started_at

    started = broker_started_at(settings)
    if started is not None:
        time.sleep(max(0.0, (started + timedelta(seconds=seconds) - datetime.now(UTC)).total_seconds()))


def _queued_bodies(settings) -> list[dict]:
    """The task messages waiting in the inference queue, decoded as a worker would (JSON only)."""
    if settings.embedded_broker:
        files = sorted((settings.broker_dir / "queue").glob(f"*.{settings.inference_queue}.msg"))
        envelopes = [json.loads(path.read_bytes()) for path in files]
    else:
        import redis

        client = redis.Redis.from_url(settings.broker)
        envelopes = [json.loads(raw) for raw in client.lrange(settings.inference_queue, 0, -1)]
    bodies = []
    for envelope in envelopes:
        assert envelope["content-type"] == "application/json"
        assert envelope["headers"]["task"] == PREDICT_TASK
        import base64

        raw = base64.b64decode(envelope["body"]) if envelope["properties"].get("body_encoding") == "base64" \
            else envelope["body"].encode()
        assert len(json.dumps(envelope)) < 100_000
        args, kwargs, _ = json.loads(raw)
        bodies.append(kwargs)
    return bodies


def test_a_batch_is_one_small_json_message_and_its_instances_become_queued(settings):
    ids = record_instances(settings, IMAGES, preprocessing_version="test")
    assert enqueue_batch(settings, ids)
    (body,) = _queued_bodies(settings)
    assert body["instance_ids"] == ids and len(body["batch_id"]) == 32
    with session_scope(settings) as session:
        rows = session.scalars(select(Instance).where(Instance.id.in_(ids))).all()
    assert {row.state for row in rows} == {"queued"}
    assert all(row.queued_at is not None and row.batch_id == body["batch_id"] for row in rows)


def test_a_32_image_batch_message_stays_far_below_100_kb(tmp_path):
    settings = embedded_settings(tmp_path)
    upgrade(settings)
    assert enqueue_batch(settings, list(range(1_000_000, 1_000_032)))
    (path,) = (settings.broker_dir / "queue").glob("*.msg")
    assert path.stat().st_size < 2_000  # ids only: the images are in the database


def test_a_dead_broker_leaves_instances_received_and_returns_quickly(tmp_path):
    settings = embedded_settings(tmp_path, broker_url=f"redis://127.0.0.1:{_closed_port()}/0")
    upgrade(settings)
    ids = record_instances(settings, IMAGES, preprocessing_version="test")
    started = time.monotonic()
    assert enqueue_batch(settings, ids) is False
    assert time.monotonic() - started < 10
    assert set(instance_states(settings, ids).values()) == {"received"}
    assert requeue_stale(settings, now=datetime.now(UTC) + timedelta(minutes=1)) == 0


def test_preparing_the_producer_at_start_connects_to_nothing(tmp_path):
    """The ingester builds its publishing app before it watches; a broker that is down is no reason to fail then."""
    settings = embedded_settings(tmp_path, broker_url=f"redis://127.0.0.1:{_closed_port()}/0")
    assert "amqp" not in vars(producer_app(settings))  # Celery builds its message layer on first use
    started = time.monotonic()
    prepare_producer(settings)
    assert time.monotonic() - started < 5
    assert "amqp" in vars(producer_app(settings))


def test_a_prediction_written_before_the_queued_mark_is_not_overwritten(settings):
    (first, second) = record_instances(settings, IMAGES[:2], preprocessing_version="test")
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id == first).values(state="predicted"))
    assert enqueue_batch(settings, [first, second])
    assert instance_states(settings, [first, second]) == {first: "predicted", second: "queued"}


def test_requeue_sends_never_sent_and_long_queued_instances_only(settings):
    # 'Long queued' is 10 s here, not the default 15 min: a queued_at older than the Redis server's start is
    # a lost batch (the restart rule, tests/test_taskqueue_recovery.py), and CI's Redis may have started minutes ago.
    settings = settings.model_copy(update={"requeue_after_seconds": 10.0})
    _wait_for_broker_uptime(settings, settings.requeue_after_seconds + 10)
    never_sent = record_instances(settings, IMAGES[:2], preprocessing_version="test")
    lost = record_instances(settings, IMAGES[:1], preprocessing_version="test", state="queued")
    recent = record_instances(settings, IMAGES[:1], preprocessing_version="test", state="queued")
    done = record_instances(settings, IMAGES[:1], preprocessing_version="test", state="predicted")
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id.in_(lost))
                        .values(queued_at=now - timedelta(seconds=settings.requeue_after_seconds + 5)))
        session.execute(update(Instance).where(Instance.id.in_(recent)).values(queued_at=now))
    # Instances younger than batch_max_wait_seconds may still be in the ingester's batcher.
    assert requeue_stale(settings, now=now - timedelta(minutes=5)) == 0
    settings_small = settings.model_copy(update={"batch_size": 2})
    assert requeue_stale(settings_small, now=now + timedelta(seconds=settings.batch_max_wait_seconds + 1)) == 3
    sent = sorted(i for body in _queued_bodies(settings) for i in body["instance_ids"])
    assert sent == sorted(never_sent + lost)
    assert len(_queued_bodies(settings)) == 2  # batches of batch_size
    states = instance_states(settings, never_sent + lost + recent + done)
    assert [states[i] for i in never_sent + lost + recent] == ["queued"] * 4 and states[done[0]] == "predicted"


def test_a_zero_grace_resends_every_queued_instance_at_once(settings):
    """What `serve` does at start-up on its embedded broker, where no worker can hold a message yet."""
    queued = record_instances(settings, IMAGES[:2], preprocessing_version="test", state="queued")
    done = record_instances(settings, IMAGES[:1], preprocessing_version="test", state="predicted")
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id.in_(queued)).values(queued_at=datetime.now(UTC)))
    assert requeue_stale(settings) == 0  # within requeue_after_seconds: presumed in flight
    assert requeue_stale(settings, queued_grace_seconds=0) == 2
    assert sorted(i for body in _queued_bodies(settings) for i in body["instance_ids"]) == sorted(queued)
    assert instance_states(settings, done) == {done[0]: "predicted"}
