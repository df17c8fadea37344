"""``covid-cxr ingest``: the watcher alone, publishing batches for workers that run elsewhere."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from covid_cxr.commandline import Subparsers, settings_from_args
from covid_cxr.settings import Settings
from db.migrate import prepare_database
from service.dicom_services import start_dicom_services
from service.http_endpoints import start_ingest_probes
from service.startup import check_layout, describe, secure_data_dir, stop_on_signals


def inbox_options() -> argparse.ArgumentParser:
    """The inbox flags ``ingest`` and ``serve`` share; each overrides its ``COVID_CXR_*`` variable."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("inbox")
    group.add_argument("--inbox", type=Path, help="watched drop folder (COVID_CXR_INBOX_DIR; default DATA_DIR/inbox)")
    group.add_argument("--after-ingest", choices=("archive", "keep", "delete"),
                       help="what happens to an accepted file (COVID_CXR_AFTER_INGEST; default archive)")
    group.add_argument("--settle-seconds", type=float,
                       help="a file is complete once unchanged this long (COVID_CXR_SETTLE_SECONDS; default 2)")
    group.add_argument("--polling", action="store_true", default=None,
                       help="poll the inbox instead of inotify, for network shares (COVID_CXR_USE_POLLING_OBSERVER)")
    group.add_argument("--batch-size", type=int, help="images per inference batch (COVID_CXR_BATCH_SIZE; default 32)")
    group.add_argument("--decode-processes", type=int,
                       help="decode processes (COVID_CXR_DECODE_PROCESSES; default: one per core)")
    return options


def inbox_settings(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment, the installation flags, the inbox flags and ``extra`` (``None``: not given)."""
    return settings_from_args(
        args,
        inbox_dir=args.inbox,
        after_ingest=args.after_ingest,
        settle_seconds=args.settle_seconds,
        use_polling_observer=args.polling,
        batch_size=args.batch_size,
        decode_processes=args.decode_processes,
        **extra,
    )


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``ingest``; `common` is the parent parser with the installation flags."""
    ingest = subparsers.add_parser(
        "ingest", parents=[common, inbox_options()], help="watch the inbox and enqueue batches (no worker)",
        description="Watch the inbox: read, normalize and record every complete file, send one inference task "
                    "per batch, and re-enqueue what was never sent. Workers run elsewhere (covid-cxr worker).")
    ingest.add_argument("--probe-port", type=int, help="serve /healthz, /readyz and /metrics on this port "
                                                       "(COVID_CXR_PROBE_PORT; default none; 0: any free port)")
    ingest.set_defaults(func=run_ingest)


def run_ingest(args: argparse.Namespace) -> int:
    from ingest.service import IngestService
    from taskqueue.producer import enqueue_batch, prepare_producer, requeue_stale

    settings = inbox_settings(args, probe_port=args.probe_port)
    check_layout(settings)
    secure_data_dir(settings)
    prepare_database(settings)
    describe(settings)
    prepare_producer(settings)
    service = IngestService(settings, enqueue=enqueue_batch, requeue=requeue_stale)
    network = start_dicom_services(settings)
    probes = start_ingest_probes(settings)
    try:
        with stop_on_signals(service.stop):
            service.run()
    finally:
        network.stop()
        if probes is not None:
            probes.stop()
    return 0
