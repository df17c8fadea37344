"""The Celery application both sides share: JSON-only messages, a GPU and a CPU queue, late acks, the schedule.

Building an app is cheap and never imports TensorFlow; the worker adds its task modules with ``include``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from queue import Empty
from time import monotonic
from typing import Any

from celery import Celery
from celery.schedules import crontab
from kombu.entity import Exchange, Queue
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from covid_cxr.constants import DEFAULT_EVALUATION_WINDOW
from covid_cxr.settings import Settings
from taskqueue.names import EVALUATE_TASK, PREDICT_TASK

#: Transport option naming this installation's queues, so the channel can route to them without binding files.
OWN_QUEUES_OPTION = "covid_cxr_queues"


class _AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, with messages that appear in the queue folder only once complete.

    kombu creates the message file and then writes it, so a worker polling in between takes an
    empty file, fails to decode it and stops ("Unrecoverable error: JSONDecodeError"). Here a
    message is written under a dot-name the consumers ignore and renamed into place.
    The broker folders are recreated when someone deletes them (kombu's worker would stop), and
    a queue whose binding file went with them is still reached: our queues are bound to an
    exchange of their own name (see :func:`_queues`).
    """

    # Same signatures as kombu's filesystem Channel, which itself departs from the abstract channel's.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self._recreate_missing_folders()
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def get_table(self, exchange: str) -> Any:
        table = super().get_table(exchange)
        if not table and exchange in self.transport_options.get(OWN_QUEUES_OPTION, ()):
            return [filesystem.exchange_queue_t(exchange, "", exchange)]
        return table

    def _recreate_missing_folders(self) -> None:
        folders = [self.data_folder_in, self.data_folder_out, self.control_folder]
        missing = [folder for folder in folders if not os.path.isdir(folder)]
        if not missing:
            return
        logging.getLogger(__name__).warning("broker folder(s) %s gone; recreating them",
                                            ", ".join(str(folder) for folder in missing))
        try:
            for folder in missing:
                os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ChannelError(f"the broker folder {missing[0]} is gone and cannot be recreated: {exc}") from exc

    def _get(self, queue: str) -> Any:  # type: ignore[override]
        self._recreate_missing_folders()
        try:
            return super()._get(queue)
        except ValueError as exc:
            # A file someone else put there; it is gone now. If it was a batch, the
            # reconciliation loop re-enqueues its instances after requeue_after_seconds.
            logging.getLogger(__name__).error("dropped an unreadable message file from queue %s: %s", queue, exc)
            raise Empty() from exc


class AtomicFilesystemTransport(filesystem.Transport):
    """The embedded broker: kombu's filesystem transport with atomic message files."""

    Channel = _AtomicFilesystemChannel


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Kombu transport options for the configured broker.

    Filesystem (embedded): one folder that producers write and consumers read, plus the
    exchange-binding ``control`` folder, all under ``settings.broker_dir``.
    Redis: a message taken by a worker that dies is made visible again after
    ``requeue_after_seconds`` (the same delay after which the reconciliation loop re-enqueues
    an instance), and connecting to a dead broker fails within seconds instead of hanging.
    """
    if settings.embedded_broker:
        root = settings.broker_dir
        return {
            "data_folder_in": str(root / "queue"),
            "data_folder_out": str(root / "queue"),
            "control_folder": str(root / "control"),
            "processed_folder": str(root / "processed"),
            "store_processed": False,
            # The worker polls the folder; 0.2 s keeps batch latency low at the cost of a cheap listdir.
            "polling_interval": 0.2,
            OWN_QUEUES_OPTION: [settings.inference_queue, settings.cpu_queue],
        }
    visibility = settings.requeue_after_seconds
    return {
        "visibility_timeout": visibility,
        # Sweep for abandoned messages often enough that a short visibility timeout takes effect.
        "unacked_restore_interval": max(1, min(10, int(visibility // 4))),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 3,
        "socket_timeout": 30,
    }


def _queues(settings: Settings) -> tuple[Queue, ...]:
    names = dict.fromkeys([settings.inference_queue, settings.cpu_queue])
    return tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in names)


def _crontab(expression: str) -> crontab:
    minute, hour, day_of_month, month_of_year, day_of_week = expression.split()
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                   month_of_year=month_of_year, day_of_week=day_of_week)


def create_app(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """A Celery app for ``settings``; the settings are available to tasks as ``app.covid_cxr_settings``.

    ``include`` names the task modules a worker registers; a producer needs none.

    For the embedded broker the broker folders are created here, so that a producer can publish
    before any worker has started.
    """
    # kombu warns about a URL without a host; the filesystem transport ignores it anyway.
    broker = "filesystem://localhost//" if settings.broker == "filesystem://" else settings.broker
    app = Celery("covid_cxr", broker=broker, include=list(include), set_as_current=False)
    transport_options = broker_transport_options(settings)
    if settings.embedded_broker:
        for key in ("data_folder_in", "control_folder", "processed_folder"):
            os.makedirs(transport_options[key], exist_ok=True)
    if settings.embedded_broker:
        app.conf.broker_transport = f"{__name__}:AtomicFilesystemTransport"
    app.conf.update(
        # Pickle would let anyone who can write to the broker run code in the workers.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # Results live in the database, not in a result backend.
        task_ignore_result=True,
        # A batch is acknowledged only once its predictions are committed; a worker that dies
        # mid-batch gives the message back, and the idempotent upsert makes redelivery harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # The model is loaded in each pool process at start-up; VGG16 takes seconds, not Celery's default 4.
        worker_proc_alive_timeout=120,
        broker_connection_retry_on_startup=True,
        # Task events (and, see service.worker_command, worker heartbeats) for Flower; off by default:
        # every task then costs a few more broker messages.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        broker_transport_options=transport_options,
        task_queues=_queues(settings),
        task_default_queue=settings.cpu_queue,
        task_default_exchange=settings.cpu_queue,
        task_default_routing_key=settings.cpu_queue,
        task_routes={
            PREDICT_TASK: {"queue": settings.inference_queue},
            EVALUATE_TASK: {"queue": settings.cpu_queue},
        },
        beat_schedule={
            "nightly-evaluation": {
                "task": EVALUATE_TASK,
                "schedule": _crontab(settings.evaluation_cron),
                "kwargs": {"window": DEFAULT_EVALUATION_WINDOW},
                "options": {"queue": settings.cpu_queue},
            },
        },
        beat_schedule_filename=str((settings.data_dir / "celerybeat-schedule").expanduser().resolve()),
        timezone="UTC",
        enable_utc=True,
    )
    app.covid_cxr_settings = settings
    app.covid_cxr_preload_model = False
    return app
