"""Producer side of the inference queue: publish batches of instance ids, and re-enqueue what was lost.

The composition root hands these functions to the ingester; never imports TensorFlow. A message carries
only instance ids (the normalized images are in the database), so it stays a few hundred bytes whatever
the batch size.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import or_, select, update

from covid_cxr.settings import Settings
from db.models import Instance, InstanceState
from db.session import session_scope
from taskqueue.app import create_app
from taskqueue.names import PREDICT_TASK

log = logging.getLogger(__name__)

#: A dead broker must not stall the ingester: try twice, quickly, then leave the instances
#: 'received' for the reconciliation loop.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}

_producers: dict[tuple[str, str, str], Celery] = {}
_producers_lock = threading.Lock()


def producer_app(settings: Settings) -> Celery:
    """One Celery app per broker and queue layout in this process, reused for every publish."""
    key = (settings.broker, settings.inference_queue, str(settings.broker_dir))
    with _producers_lock:
        app = _producers.get(key)
        if app is None:
            app = _producers[key] = create_app(settings)
        return app


def prepare_producer(settings: Settings) -> None:
    """Build the publishing app and its message layer now, at start (Celery imports it on first use, about
    half a second of CPU), so that the first batch of a burst does not wait for it. Connects to nothing."""
    _ = producer_app(settings).amqp


def enqueue_batch(settings: Settings, instance_ids: list[int]) -> bool:
    """Publish one inference task for ``instance_ids`` and mark them ``queued``.

    Returns ``False``, with a warning logged and the instances left ``received``, when the broker
    cannot be reached; the reconciliation loop (:func:`requeue_stale`) sends them later.
    Publishing happens before the state change so that a crash in between leaves the instances
    ``received`` (re-sent, harmlessly) rather than ``queued`` with no message.
    """
    ids = sorted({int(i) for i in instance_ids})
    if not ids:
        return True
    batch_id = uuid.uuid4().hex
    try:
        producer_app(settings).send_task(
            PREDICT_TASK,
            kwargs={"instance_ids": ids, "batch_id": batch_id},
            task_id=batch_id,  # the broker can be asked whether a batch still waits (taskqueue.recovery)
            queue=settings.inference_queue,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
    except Exception as exc:  # kombu raises OperationalError, transports raise their own: all mean "not sent"
        log.warning("broker %s unreachable, %d instance(s) stay 'received' for the reconciliation loop: %s",
                    _redacted(settings.broker), len(ids), exc)
        return False
    with session_scope(settings) as session:
        # A fast worker may already have predicted them: only 'received'/'queued' rows move.
        session.execute(
            update(Instance)
            .where(Instance.id.in_(ids),
                   Instance.state.in_([InstanceState.received, InstanceState.queued]))
            .values(state=InstanceState.queued, queued_at=_utcnow(), batch_id=batch_id)
        )
    log.debug("batch %s: %d instance(s) sent to queue %s", batch_id, len(ids), settings.inference_queue)
    return True


def requeue_stale(settings: Settings, now: datetime | None = None, *,
                  queued_grace_seconds: float | None = None) -> int:
    """Re-enqueue instances that were recorded but never sent, or sent and apparently lost.

    Selected: ``received`` instances older than ``batch_max_wait_seconds`` (younger ones may still
    sit in the ingester's batcher), ``queued`` instances whose ``queued_at`` is older than
    ``queued_grace_seconds`` (default ``requeue_after_seconds``; 0 re-sends every queued instance,
    which ``serve`` does at start-up because no worker of its embedded broker can be running yet),
    and ``queued`` instances whose batch is lost (:func:`taskqueue.recovery.lost_instance_ids`:
    sent before the broker restarted, or quiet for ``batch_timeout_seconds`` and in no queue).
    Sending an instance twice is harmless: the worker skips instances already predicted and
    prediction writes are idempotent. Sends in batches of ``batch_size`` and stops at the first
    batch the broker refuses.

    Returns
    -------
    int
        How many instances were sent.
    """
    from taskqueue.recovery import lost_instance_ids

    now = now or _utcnow()
    received_before = now - timedelta(seconds=settings.batch_max_wait_seconds)
    grace = settings.requeue_after_seconds if queued_grace_seconds is None else queued_grace_seconds
    queued_before = now - timedelta(seconds=grace)
    with session_scope(settings) as session:
        ids = session.scalars(
            select(Instance.id)
            .where(or_(
                (Instance.state == InstanceState.received) & (Instance.created_at <= received_before),
                (Instance.state == InstanceState.queued) & (Instance.queued_at <= queued_before),
            ))
            .order_by(Instance.id)
        ).all()
    sent = send_in_batches(settings, sorted(set(ids).union(lost_instance_ids(settings, now))))
    if sent:
        log.info("re-enqueued %d instance(s) that were never sent or whose message was lost", sent)
    return sent


def send_in_batches(settings: Settings, instance_ids: Sequence[int]) -> int:
    """Send ``instance_ids`` in order, ``batch_size`` per task; stops at the first batch the broker refuses.

    Returns how many were sent; the rest stay as they are (``received`` ones for the reconciliation).
    """
    ids = list(instance_ids)
    sent = 0
    for start in range(0, len(ids), settings.batch_size):
        chunk = ids[start:start + settings.batch_size]
        if not enqueue_batch(settings, chunk):
            break
        sent += len(chunk)
    return sent


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _redacted(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
