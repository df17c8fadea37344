"""Lost batches: 'queued' instances whose message is gone, found within minutes instead of the 15-minute sweep.

A batch's task id is its ``batch_id``, so the broker can be asked which batches still wait in the
inference queue. A batch is *lost* when

* it was sent before the broker last started (a Redis restart without persistence empties the
  queue and the messages workers had taken), or
* it shows no sign of life for ``batch_timeout_seconds`` and is not waiting in the queue. Signs of
  life are the instance rows' ``updated_at``: set when the batch is sent, when a worker claims it,
  every few seconds by that worker's heartbeat while it runs (:mod:`worker.heartbeat`) and when an
  attempt fails. A batch taken by a worker that was killed, or given up by a worker that could not
  reach the database, goes quiet.

Re-sending is safe (the worker skips instances already predicted and writes predictions with
insert-or-ignore), so a doubt is resolved by sending again, never by waiting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from covid_cxr.settings import Settings
from db.models import Instance, InstanceState
from db.session import session_scope
from taskqueue.producer import producer_app, send_in_batches

log = logging.getLogger(__name__)

#: Clock slack (seconds) between "sent" and "the broker started": a batch sent this close to a restart is left to
#: the timeout instead.
RESTART_SLACK_SECONDS = 2.0


def heartbeat_interval(settings: Settings) -> float:
    """How often a worker running a batch marks its instances alive: a few times per ``batch_timeout_seconds``."""
    return max(0.5, min(30.0, settings.batch_timeout_seconds / 4))


def waiting_batch_ids(settings: Settings, taken_within_seconds: float = 0.0) -> set[str] | None:
    """Batch ids the broker still has: waiting in the inference queue, or taken by a worker lately; ``None`` if unknown.

    The folder broker: the message files of the inference queue (a message a worker took is gone
    from there). Redis: the queue's lists (one per priority step), and the messages workers took
    within the last ``taken_within_seconds`` and have not acknowledged (a worker whose pool is still
    loading the model holds its message without a sign in the database). Any other transport, or a
    broker that cannot be read, gives ``None``.
    """
    if settings.embedded_broker:
        return _folder_batch_ids(settings.broker_dir / "queue", settings.inference_queue)
    if settings.broker.startswith(("redis://", "rediss://")):
        try:
            return _redis_batch_ids(settings, taken_within_seconds)
        except Exception as exc:  # any transport error: unknown, and the caller waits for the next round
            log.warning("could not read the inference queue: %s: %s", type(exc).__name__, exc)
    return None


def broker_started_at(settings: Settings) -> datetime | None:
    """When the Redis server last started (uptime back from now); ``None`` for the folder broker or unknown."""
    if not settings.broker.startswith(("redis://", "rediss://")):
        return None
    try:
        with _redis_channel(settings) as channel:
            uptime = float(channel.client.info("server")["uptime_in_seconds"])
    except Exception as exc:  # unknown: the timeout rule still finds what was lost
        log.debug("no broker start time: %s: %s", type(exc).__name__, exc)
        return None
    return _utcnow() - timedelta(seconds=uptime)


def lost_instance_ids(settings: Settings, now: datetime | None = None, *,
                      quiet_seconds: float | None = None) -> list[int]:
    """Ids of ``queued`` instances whose batch is lost (see the module docstring), in id order.

    ``quiet_seconds`` (default ``batch_timeout_seconds``) is how long without a sign of life makes a
    batch that is not waiting in the queue lost; ``serve`` passes 0 once its only worker has died.
    """
    now = now or _utcnow()
    quiet = settings.batch_timeout_seconds if quiet_seconds is None else quiet_seconds
    lost: set[int] = set()
    started = broker_started_at(settings)
    if started is not None:
        before_restart = started - timedelta(seconds=RESTART_SLACK_SECONDS)
        lost.update(_queued(settings, Instance.queued_at < before_restart))
        if lost:
            log.warning("the broker restarted at %s: %d queued instance(s) sent before are re-sent",
                        started.isoformat(timespec="seconds"), len(lost))
    quiet_since = now - timedelta(seconds=quiet)
    if _count_queued(settings, Instance.updated_at <= quiet_since):
        # The broker first, then the rows: a batch a worker takes in between has been claimed by then.
        waiting = waiting_batch_ids(settings, taken_within_seconds=quiet)
        if waiting is not None:
            quiet_ids = set(_queued(settings, Instance.updated_at <= quiet_since, exclude_batches=waiting)) - lost
            if quiet_ids:
                log.warning("%d queued instance(s) in no queue and without a worker's heartbeat for %.0f s: re-sent",
                            len(quiet_ids), quiet)
            lost.update(quiet_ids)
    return sorted(lost)


def requeue_lost(settings: Settings, *, quiet_seconds: float | None = None) -> int:
    """Re-send the lost batches now (see :func:`lost_instance_ids`); returns how many instances were sent."""
    sent = send_in_batches(settings, lost_instance_ids(settings, quiet_seconds=quiet_seconds))
    if sent:
        log.info("re-sent %d instance(s) of lost batches", sent)
    return sent


def overdue_summary(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """Work waiting longer than expected: ``received``/``queued`` instances quiet for ``batch_timeout_seconds``.

    Plain data for ``status`` and the dashboard: how many, in how many batches, the longest quiet
    time in seconds, and the threshold. A deep but moving queue shows here too: its batches wait
    longer than a batch takes.
    """
    now = now or _utcnow()
    quiet_since = now - timedelta(seconds=settings.batch_timeout_seconds)
    pending = Instance.state.in_([InstanceState.received, InstanceState.queued])
    with session_scope(settings) as session:
        row = session.execute(
            select(func.count(), func.count(func.distinct(Instance.batch_id)), func.min(Instance.updated_at))
            .where(pending, Instance.updated_at <= quiet_since)
        ).one()
    count, batches, oldest = row
    return {
        "instances": int(count or 0),
        "batches": int(batches or 0),
        "longest_quiet_seconds": None if oldest is None else round((now - _aware(oldest)).total_seconds(), 1),
        "after_seconds": settings.batch_timeout_seconds,
    }


# --- reading the broker ----------------------------------------------------------------------------


def _folder_batch_ids(folder: Path, queue: str) -> set[str]:
    ids: set[str] = set()
    suffix = f".{queue}.msg"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return ids
    for name in names:
        if name.startswith(".") or not name.endswith(suffix):
            continue
        try:
            ids.update(_task_ids([(folder / name).read_bytes()]))
        except FileNotFoundError:  # a worker took it just now: it is being claimed
            continue
    return ids


def _redis_batch_ids(settings: Settings, taken_within_seconds: float) -> set[str]:
    with _redis_channel(settings) as channel:
        client = channel.client
        keys = dict.fromkeys(channel._q_for_pri(settings.inference_queue, step) for step in channel.priority_steps)
        raw: list[Any] = []
        for key in keys:
            raw.extend(client.lrange(key, 0, -1))
        if taken_within_seconds > 0:
            # kombu keeps each unacknowledged message under its delivery tag, scored by when it was taken.
            since = time.time() - taken_within_seconds
            tags = client.zrangebyscore(channel.unacked_index_key, since, "+inf")
            if tags:
                for held in client.hmget(channel.unacked_key, tags):
                    with contextlib.suppress(ValueError, TypeError, IndexError):
                        raw.append(json.loads(held)[0])  # [message, exchange, routing key]
    return _task_ids(raw)


@contextmanager
def _redis_channel(settings: Settings) -> Iterator[Any]:
    """A kombu Redis channel on the producer's connection, for reading; released on exit."""
    connection = producer_app(settings).connection_for_read()
    try:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5)
        yield connection.default_channel
    finally:
        connection.release()


def _task_ids(messages: Iterable[Any]) -> set[str]:
    """Task ids of broker messages, given as JSON text or as decoded envelopes; anything else is skipped."""
    ids: set[str] = set()
    for message in messages:
        try:
            envelope = json.loads(message) if isinstance(message, bytes | str) else message
            task_id = envelope["headers"]["id"]
        except (ValueError, KeyError, TypeError):  # not one of ours: the worker drops it
            continue
        if isinstance(task_id, str):
            ids.add(task_id)
    return ids


# --- reading the rows ------------------------------------------------------------------------------


def _queued(settings: Settings, condition: Any, exclude_batches: set[str] | None = None) -> list[int]:
    query = select(Instance.id, Instance.batch_id).where(Instance.state == InstanceState.queued, condition)
    with session_scope(settings) as session:
        rows = session.execute(query.order_by(Instance.id)).all()
    return [row.id for row in rows if not exclude_batches or row.batch_id not in exclude_batches]


def _count_queued(settings: Settings, condition: Any) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(
            select(func.count()).select_from(Instance).where(Instance.state == InstanceState.queued, condition)
        ) or 0)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes; every timestamp this project writes is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
