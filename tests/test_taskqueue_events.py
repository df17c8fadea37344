"""Task events for Flower: off by default; with ``COVID_CXR_TASK_EVENTS`` a real worker on Redis sends them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from service_fixtures import distributed_settings, start_worker, wait_until

from covid_cxr.settings import Settings
from taskqueue.app import create_app


def test_events_are_off_unless_configured(tmp_path: Path) -> None:
    from service.worker_command import worker_command

    quiet = create_app(distributed_settings(tmp_path, "sqlite://", "redis://127.0.0.1:6379/15"))
    assert not quiet.conf.worker_send_task_events and not quiet.conf.task_send_sent_event
    loud = create_app(distributed_settings(tmp_path, "sqlite://", "redis://127.0.0.1:6379/15", task_events=True))
    assert loud.conf.worker_send_task_events and loud.conf.task_send_sent_event
    _, env = worker_command(distributed_settings(tmp_path, "sqlite://", "redis://x", task_events=True), ["gpu"])
    assert '"task_events": true' in env["COVID_CXR_WORKER_SETTINGS_JSON"]


@contextmanager
def capturing_events(settings: Settings) -> Iterator[list[dict[str, Any]]]:
    """Every Celery event on the broker while inside, as Flower's receiver sees them."""
    app = create_app(settings)
    events: list[dict[str, Any]] = []
    connection = app.connection_for_read()
    receiver = app.events.Receiver(connection, handlers={"*": events.append})
    thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True)
    thread.start()
    try:
        yield events
    finally:
        receiver.should_stop = True
        thread.join(10)
        connection.release()


@pytest.mark.redis
@pytest.mark.postgres
def test_a_worker_on_redis_sends_task_events_and_heartbeats(tmp_path: Path, postgres_url: str,
                                                            redis_url: str) -> None:
    from db.migrate import upgrade
    from taskqueue.producer import enqueue_batch

    settings = distributed_settings(tmp_path, postgres_url, redis_url, task_events=True)
    upgrade(settings)
    with capturing_events(settings) as events, start_worker(settings, pool="solo"):
        # A heartbeat shows that the worker is seen online (Flower's worker list) and that the receiver listens.
        wait_until(lambda: any(e["type"] == "worker-heartbeat" for e in events), timeout=30, what="a heartbeat")
        assert enqueue_batch(settings, [987654321])  # no such instance: the task succeeds, predicting nothing
        wanted = {"task-sent", "task-received", "task-started", "task-succeeded"}
        wait_until(lambda: wanted <= {e["type"] for e in events}, timeout=30, what=f"events {sorted(wanted)}")
    succeeded = next(e for e in events if e["type"] == "task-succeeded")
    sent = next(e for e in events if e["type"] == "task-sent")
    assert sent["uuid"] == succeeded["uuid"] and sent["name"] == "covid_cxr.predict_batch"
