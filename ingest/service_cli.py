"""``covid-cxr ingest`` (the watcher alone) and ``covid-cxr serve`` (watcher, worker and scheduler in one command)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from covid_cxr.cli import settings_from_args
from covid_cxr.errors import ConfigurationError, NoActiveModel
from covid_cxr.settings import Settings

log = logging.getLogger(__name__)

#: Seconds a stopping worker may take to finish its batch before it is killed (the batch is redelivered).
WORKER_STOP_SECONDS = 30.0


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``ingest`` and ``serve``; `common` is the parent parser with the installation flags."""
    watcher_options = argparse.ArgumentParser(add_help=False)
    group = watcher_options.add_argument_group("inbox")
    group.add_argument("--inbox", type=Path, help="watched drop folder (COVID_CXR_INBOX_DIR; default DATA_DIR/inbox)")
    group.add_argument("--after-ingest", choices=("archive", "keep", "delete"),
                       help="what happens to an accepted file (COVID_CXR_AFTER_INGEST; default archive)")
    group.add_argument("--settle-seconds", type=float,
                       help="a file is complete once unchanged this long (COVID_CXR_SETTLE_SECONDS; default 2)")
    group.add_argument("--polling", action="store_true", default=None,
                       help="poll the inbox instead of inotify, for network shares (COVID_CXR_USE_POLLING_OBSERVER)")
    group.add_argument("--batch-size", type=int, help="images per inference batch (COVID_CXR_BATCH_SIZE; default 32)")

    ingest = subparsers.add_parser(
        "ingest", parents=[common, watcher_options], help="watch the inbox and enqueue batches (no worker)",
        description="Watch the inbox: read, normalize and record every complete file, send one inference task "
                    "per batch, and re-enqueue what was never sent. Workers run elsewhere (covid-cxr worker).")
    ingest.set_defaults(func=_ingest)

    serve = subparsers.add_parser(
        "serve", parents=[common, watcher_options],
        help="the whole service in one command: watcher, worker and scheduler (embedded default)",
        description="Run the watcher here and one worker subprocess (inference, evaluation and the nightly "
                    "schedule). With no configuration this is the embedded mode: SQLite and a folder broker under "
                    "--data-dir, nothing else to install. Ctrl-C stops both cleanly.")
    serve.add_argument("--concurrency", type=int, default=1,
                       help="worker pool processes, each with its own model copy (default 1)")
    serve.set_defaults(func=_serve)


def _settings(args: argparse.Namespace) -> Settings:
    return settings_from_args(
        args,
        inbox_dir=args.inbox,
        after_ingest=args.after_ingest,
        settle_seconds=args.settle_seconds,
        use_polling_observer=args.polling,
        batch_size=args.batch_size,
    )


def prepare_database(settings: Settings) -> None:
    """Create the embedded database on first use; otherwise refuse a schema that is not at head.

    Only the embedded default (no ``database_url``) is ever created here: a configured server
    database is migrated on purpose, by ``covid-cxr db upgrade``.
    """
    from db.migrate import check_schema, upgrade

    embedded_file = settings.data_dir.expanduser() / "covid-cxr.sqlite3"
    if settings.database_url is None and not embedded_file.exists():
        revision = upgrade(settings)
        log.info("created the database %s (schema %s)", embedded_file.resolve(), revision)
        return
    check_schema(settings)


def require_active_model(settings: Settings) -> Any:
    """The active model record for ``settings.model_name``; :class:`NoActiveModel` says how to get one."""
    from model_store.registry import get_active

    try:
        return get_active(settings, settings.model_name)
    except NoActiveModel as exc:
        raise NoActiveModel(
            f"{exc.message}. The service does not start without a model. For a first try, train a small one "
            f"on the sample images shipped in the repository (a few minutes on a laptop):\n"
            f"    covid-cxr train --data-dir {settings.data_dir} --csv samples/cxr/metadata.csv --epochs 5 --activate"
        ) from exc


def check_layout(settings: Settings) -> None:
    """Refuse an inbox that would swallow the installation's own files."""
    inbox = settings.inbox.expanduser().resolve()
    data_dir = settings.data_dir.expanduser().resolve()
    if inbox == data_dir:
        raise ConfigurationError(f"the inbox {inbox} is the data dir itself; give the inbox a folder of its own")
    for name, folder in (("archive", settings.archive), ("quarantine", settings.quarantine)):
        folder = folder.expanduser().resolve()
        if inbox == folder or folder in inbox.parents:
            raise ConfigurationError(f"the inbox {inbox} lies in the {name} folder {folder}; files would loop")


def _describe(settings: Settings) -> None:
    from kombu.utils.url import maybe_sanitize_url

    log.info("database %s | broker %s | archive %s | quarantine %s",
             maybe_sanitize_url(settings.database), maybe_sanitize_url(settings.broker),
             settings.archive.resolve(), settings.quarantine.resolve())


def _ingest(args: argparse.Namespace) -> int:
    from ingest.service import IngestService

    settings = _settings(args)
    check_layout(settings)
    prepare_database(settings)
    _describe(settings)
    service = IngestService(settings)
    with _stop_on_signals(service.stop):
        service.run()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ingest.service import IngestService
    from worker.app import worker_command

    settings = _settings(args)
    check_layout(settings)
    prepare_database(settings)
    model = require_active_model(settings)
    _describe(settings)
    log.info("serving model %s version %s", settings.model_name, getattr(model, "version", "?"))
    service = IngestService(settings)
    if settings.embedded_broker:
        # The folder broker drops a message once a worker takes it, so a batch whose worker died
        # with the last `serve` exists only as 'queued' rows. This `serve` owns the only worker,
        # so none is in flight now: re-send them at once rather than after requeue_after_seconds.
        from worker.dispatch import requeue_stale

        resent = requeue_stale(settings, queued_grace_seconds=0)
        if resent:
            log.info("re-sent %d instance(s) left queued or unsent by the previous run", resent)
    command = worker_command(settings, [settings.inference_queue, settings.cpu_queue],
                             concurrency=args.concurrency, beat=True)
    # Own session: Ctrl-C reaches only this process, which then stops the worker in order
    # (warm shutdown: the batch at hand finishes, or is redelivered if it must be killed).
    worker = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
    log.info("worker process %d started (queues %s, %s; scheduler on)", worker.pid,
             settings.inference_queue, settings.cpu_queue)
    failure: list[int] = []

    def watch_worker() -> None:
        code = worker.wait()
        if not service.stopping:
            failure.append(code)
            log.error("the worker process exited with status %s; stopping", code)
            service.stop()

    threading.Thread(target=watch_worker, name="worker-watch", daemon=True).start()
    try:
        with _stop_on_signals(service.stop):
            service.run()
    finally:
        _stop_worker(worker)
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


class _stop_on_signals:
    """While active, SIGINT and SIGTERM call ``stop`` instead of raising (a second one raises as usual)."""

    def __init__(self, stop: Any) -> None:
        self._stop = stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        log.info("%s received: stopping after the file at hand (again to stop at once)", signal.Signals(signum).name)
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._stop()

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
