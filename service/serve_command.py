"""``covid-cxr serve``: the whole service in one command (watcher here, one worker subprocess with the scheduler)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from covid_cxr.commandline import Subparsers
from db.migrate import prepare_database
from service.dicom_services import start_dicom_services
from service.http_endpoints import MULTIPROCESS_ENV, metrics_folder, start_dashboard
from service.ingest_command import inbox_options, inbox_settings
from service.startup import check_layout, describe, require_active_model, secure_data_dir, stop_on_signals
from service.supervisor import WorkerSupervisor
from service.worker_command import worker_command

log = logging.getLogger(__name__)

def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``serve``; `common` is the parent parser with the installation flags."""
    serve = subparsers.add_parser(
        "serve", parents=[common, inbox_options()],
        help="the whole service in one command: watcher, worker and scheduler (embedded default)",
        description="Run the watcher here and one worker subprocess (inference, evaluation and the nightly "
                    "schedule). With no configuration this is the embedded mode: SQLite and a folder broker under "
                    "--data-dir, nothing else to install. Ctrl-C stops both cleanly.")
    serve.add_argument("--concurrency", type=int, default=1,
                       help="worker pool processes, each with its own model copy (default 1)")
    serve.add_argument("--web-host", help="interface of the dashboard (COVID_CXR_WEB_HOST; default 127.0.0.1)")
    serve.add_argument("--web-port", type=int,
                       help="port of the dashboard, /healthz, /readyz and /metrics (COVID_CXR_WEB_PORT; default 8080)")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from ingest.service import IngestService
    from taskqueue.producer import enqueue_batch, prepare_producer, requeue_stale
    from taskqueue.recovery import requeue_lost

    settings = inbox_settings(args, web_host=args.web_host, web_port=args.web_port)
    check_layout(settings)
    secure_data_dir(settings)
    prepare_database(settings)
    model = require_active_model(settings)
    describe(settings)
    log.info("serving model %s version %s", settings.model_name, model.version)
    prepare_producer(settings)
    service = IngestService(settings, enqueue=enqueue_batch, requeue=requeue_stale)
    if settings.embedded_broker:
        # The folder broker drops a message once a worker takes it, so a batch whose worker died
        # with the last `serve` exists only as 'queued' rows. This `serve` owns the only worker,
        # so none is in flight now: re-send at once what is not waiting in the broker folder.
        resent = requeue_lost(settings, quiet_seconds=0)
        if resent:
            log.info("re-sent %d instance(s) left queued or unsent by the previous run", resent)
    command, env = worker_command(settings, [settings.inference_queue, settings.cpu_queue],
                                  concurrency=args.concurrency, beat=True)
    # The worker's pool processes count in files that the dashboard here adds up.
    folder = metrics_folder(settings, "serve")
    env[MULTIPROCESS_ENV] = str(folder)
    dashboard = start_dashboard(settings, serve_metrics_folder=folder)
    network = start_dicom_services(settings)

    def start_worker() -> subprocess.Popen[bytes]:
        # Own session: Ctrl-C reaches only this process, which then stops the worker in order
        # (warm shutdown: the batch at hand finishes, or is redelivered if it must be killed).
        worker = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True,
                                  preexec_fn=_die_with_parent)
        log.info("worker process %d started (queues %s, %s; scheduler on)", worker.pid,
                 settings.inference_queue, settings.cpu_queue)
        return worker

    failure: list[int] = []

    def give_up(code: int) -> None:
        failure.append(code)
        service.stop()

    # With the embedded broker its only worker is dead, so nothing is in flight: whatever is queued and not
    # waiting in the broker folder is lost. Other brokers may have other workers: the usual timeout applies.
    supervisor = WorkerSupervisor(start_worker, give_up=give_up, after_death=lambda: requeue_lost(
        settings, quiet_seconds=0 if settings.embedded_broker else None))
    supervisor.start()
    try:
        with stop_on_signals(service.stop):
            service.run()
    finally:
        supervisor.stop()
        network.stop()
        dashboard.stop()
    return 1 if failure else 0


def _die_with_parent() -> None:
    """In the child: get SIGTERM if ``serve`` dies without stopping it (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
