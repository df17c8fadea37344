"""``covid-cxr serve``: the whole service in one command (watcher here, one worker subprocess with the scheduler)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading

from covid_cxr.commandline import Subparsers
from db.migrate import prepare_database
from service.dicom_services import start_dicom_services
from service.http_endpoints import MULTIPROCESS_ENV, metrics_folder, start_dashboard
from service.ingest_command import inbox_options, inbox_settings
from service.startup import check_layout, describe, require_active_model, secure_data_dir, stop_on_signals
from service.worker_command import worker_command

log = logging.getLogger(__name__)

#: Seconds a stopping worker may take to finish its batch before it is killed (the batch is redelivered).
WORKER_STOP_SECONDS = 30.0


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
    from taskqueue.producer import enqueue_batch, requeue_stale

    settings = inbox_settings(args, web_host=args.web_host, web_port=args.web_port)
    check_layout(settings)
    secure_data_dir(settings)
    prepare_database(settings)
    model = require_active_model(settings)
    describe(settings)
    log.info("serving model %s version %s", settings.model_name, model.version)
    service = IngestService(settings, enqueue=enqueue_batch, requeue=requeue_stale)
    if settings.embedded_broker:
        # The folder broker drops a message once a worker takes it, so a batch whose worker died
        # with the last `serve` exists only as 'queued' rows. This `serve` owns the only worker,
        # so none is in flight now: re-send them at once rather than after requeue_after_seconds.
        resent = requeue_stale(settings, queued_grace_seconds=0)
        if resent:
            log.info("re-sent %d instance(s) left queued or unsent by the previous run", resent)
    command, env = worker_command(settings, [settings.inference_queue, settings.cpu_queue],
                             concurrency=args.concurrency, beat=True)
    # The worker's pool processes count in files that the dashboard here adds up.
    folder = metrics_folder(settings, "serve")
    env[MULTIPROCESS_ENV] = str(folder)
    dashboard = start_dashboard(settings, serve_metrics_folder=folder)
    network = start_dicom_services(settings)
    # Own session: Ctrl-C reaches only this process, which then stops the worker in order
    # (warm shutdown: the batch at hand finishes, or is redelivered if it must be killed).
    worker = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True,
                              preexec_fn=_die_with_parent)
    log.info("worker process %d started (queues %s, %s; scheduler on)", worker.pid,
             settings.inference_queue, settings.cpu_queue)
    failure: list[int] = []

    def watch_worker() -> None:
        code = worker.wait()
        if not service.stopping:
            failure.append(code)
            log.error("the worker process exited with status %s (its reason is logged just above); stopping", code)
            service.stop()

    threading.Thread(target=watch_worker, name="worker-watch", daemon=True).start()
    try:
        with stop_on_signals(service.stop):
            service.run()
    finally:
        _stop_worker(worker)
        network.stop()
        dashboard.stop()
    return 1 if failure else 0


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        return
    log.info("stopping the worker process %d (up to %.0fs for the batch at hand)", worker.pid, WORKER_STOP_SECONDS)
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=WORKER_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("the worker did not stop in time; killing it (its batch will be redelivered)")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if ``serve`` dies without stopping it (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
