"""``covid-cxr worker``: a Celery worker process, and the command line that starts one from ``serve`` or tests."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from covid_cxr.commandline import Subparsers, settings_from_args
from covid_cxr.errors import UsageError
from covid_cxr.settings import Settings
from service.http_endpoints import start_worker_probes
from service.startup import secure_data_dir

log = logging.getLogger(__name__)

POOLS = ("prefork", "solo", "threads")
#: Environment variable in which a parent hands its settings to the worker it starts (JSON, never argv).
SETTINGS_ENV = "COVID_CXR_WORKER_SETTINGS_JSON"
#: Installation settings the handed-over settings may carry and the common flags may override.
_COMMON_FIELDS = ("data_dir", "database_url", "broker_url")
#: Settings never handed to a worker: workers do not pseudonymize, and the one ``serve`` starts answers no HTTP.
_NOT_FOR_WORKERS = frozenset({"pseudonym_key", "web_token"})


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``worker``; `common` is the parent parser with the installation flags."""
    worker = subparsers.add_parser(
        "worker", parents=[common], help="run a Celery worker (inference and/or evaluation)",
        description="Run a Celery worker. The defaults suit one GPU: both queues, one pool process "
                    "(one model copy), prefetch 1. Refuses to start on an out-of-date database schema.")
    worker.add_argument("--queues", help="comma-separated queues to consume (default: the inference and CPU "
                                         "queues, COVID_CXR_INFERENCE_QUEUE and COVID_CXR_CPU_QUEUE)")
    worker.add_argument("--concurrency", type=int, default=1,
                        help="pool processes (default 1; each one serving the inference queue loads its own model)")
    worker.add_argument("--beat", action="store_true",
                        help="also run the scheduler (nightly evaluation); run it in exactly one worker")
    worker.add_argument("--pool", choices=POOLS, default="prefork", help="Celery pool (default prefork)")
    worker.add_argument("--loglevel", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level (default COVID_CXR_LOG_LEVEL)")
    worker.add_argument("--hostname", help="Celery node name (default covid-cxr-QUEUES-RANDOM@host)")
    worker.add_argument("--probe-port", type=int, help="serve /healthz, /readyz and /metrics on this port "
                                                       "(COVID_CXR_PROBE_PORT; default none; 0: any free port)")
    worker.set_defaults(func=run_worker)


def _settings(args: argparse.Namespace) -> Settings:
    """Settings of a worker: those its parent handed over in the environment (see :func:`worker_command`) first."""
    extra: dict[str, Any] = {}
    handed_over = os.environ.pop(SETTINGS_ENV, None)  # read once; the pool processes need not see it
    if handed_over:
        extra = json.loads(handed_over)
        for name in _COMMON_FIELDS:
            given = extra.pop(name, None)
            if getattr(args, name, None) is None:
                setattr(args, name, given)
    if getattr(args, "probe_port", None) is not None:
        extra["probe_port"] = args.probe_port
    return settings_from_args(args, **extra)


def run_worker(args: argparse.Namespace) -> int:
    from celery.signals import worker_init, worker_process_init

    from db.migrate import check_schema
    from db.session import dispose_engines
    from worker.app import create_worker_app

    settings = _settings(args)
    queues = [q.strip() for q in (args.queues or f"{settings.inference_queue},{settings.cpu_queue}").split(",")
              if q.strip()]
    if not queues:
        raise UsageError("--queues names no queue")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    secure_data_dir(settings)  # the embedded database and the evaluation reports are PHI
    check_schema(settings)
    # The parent forks the pool: it must hold no database connection (and never TensorFlow).
    dispose_engines()
    serves_inference = settings.inference_queue in queues
    # First: the probes choose the metrics folder the pool processes count in, before they are forked.
    probes = start_worker_probes(settings, serves_inference)
    if probes is not None:
        # A forked pool process inherits the listening socket; only this process answers on it.
        # (The solo pool sends the same signal in this very process: the socket stays open then.)
        parent = os.getpid()
        worker_process_init.connect(
            lambda **_: probes.close_inherited_socket() if os.getpid() != parent else None, weak=False)
    if serves_inference and args.concurrency > 1:
        log.warning("%d pool processes on queue %s: each loads its own model copy (memory, GPU)",
                    args.concurrency, settings.inference_queue)
    app = create_worker_app(settings)
    app.covid_cxr_preload_model = serves_inference and args.pool == "prefork"
    argv = [
        "worker",
        "--queues", ",".join(dict.fromkeys(queues)),
        "--concurrency", str(args.concurrency),
        "--pool", args.pool,
        "--loglevel", args.loglevel or settings.log_level,
        # Gossip and mingle coordinate workers that share revocations and results; this service needs
        # neither, and they slow start-up on the filesystem broker. Heartbeats are events: Flower shows
        # a worker as online only while they come, so they are sent when task events are on.
        "--without-gossip", "--without-mingle",
        *([] if settings.task_events else ["--without-heartbeat"]),
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    if args.beat:
        # The schedule file lives in the data dir, which a PostgreSQL + Redis installation may not have yet.
        Path(app.conf.beat_schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", "--schedule", app.conf.beat_schedule_filename]
    # Celery's worker_main discards the worker's exit status; read it from the worker itself, so that a
    # worker stopped by an unrecoverable error (its broker folder gone for good, say) exits non-zero.
    controllers: list[Any] = []

    def remember(sender: Any = None, **_: Any) -> None:
        controllers.append(sender)

    worker_init.connect(remember, weak=False)
    try:
        app.worker_main(argv)
    finally:
        if probes is not None:
            probes.stop()
    return int(getattr(controllers[-1], "exitcode", 0) or 0) if controllers else 0


def worker_command(settings: Settings, queues: list[str], concurrency: int = 1, beat: bool = False,
                   pool: str = "prefork", *, loglevel: str | None = None,
                   hostname: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv of a worker process for ``settings`` (``covid-cxr worker`` run by this Python), and its environment.

    Every setting that differs from its default travels in the returned environment variable, never
    on the command line, where ``ps`` would show a database password to every user of the machine;
    paths are made absolute so the child's working directory does not matter. Start the child with
    ``env={**os.environ, **env}``.

    Parameters
    ----------
    queues
        Queue names to consume, e.g. ``[settings.inference_queue]``.
    concurrency
        Pool processes; each one that serves the inference queue loads its own model copy.
    beat
        Also run the scheduler (the nightly evaluation) inside this worker: one per installation.
    pool
        Celery pool: ``prefork`` (default), ``solo`` or ``threads``.
    """
    explicit = settings.model_dump(mode="json", include=settings.model_fields_set - _NOT_FOR_WORKERS)
    for key, value in list(explicit.items()):
        if key.endswith("_dir") and value is not None:
            explicit[key] = str(getattr(settings, key).expanduser().resolve())
    explicit["data_dir"] = str(settings.data_dir.expanduser().resolve())
    argv = [
        sys.executable, "-m", "covid_cxr", "worker",
        "--queues", ",".join(queues),
        "--concurrency", str(concurrency),
        "--pool", pool,
        "--hostname", hostname or f"covid-cxr-{'-'.join(queues)}-{uuid.uuid4().hex[:8]}@%h",
    ]
    if loglevel:
        argv += ["--loglevel", loglevel]
    if beat:
        argv.append("--beat")
    return argv, {SETTINGS_ENV: json.dumps(explicit, sort_keys=True)}
