"""``covid-cxr deliver``: the results outbox alone (make reports, send them), one pass, or a dead-letter retry."""

from __future__ import annotations

import argparse
import json
import sys
import threading

from covid_cxr.commandline import Subparsers, settings_from_args
from covid_cxr.errors import ConfigurationError
from db.migrate import prepare_database
from service.dicom_services import quiet_dicom_libraries
from service.startup import secure_data_dir, stop_on_signals


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``deliver``; `common` is the parent parser with the installation flags."""
    deliver = subparsers.add_parser(
        "deliver", parents=[common], help="make DICOM SR reports of new results and send them to the destinations",
        description="Run the results outbox: make a Structured Report for every study result without an "
                    "up-to-date one, and send every due delivery to COVID_CXR_DICOM_DESTINATIONS, retrying with "
                    "backoff. `serve` and `ingest` run the same loop when destinations are configured; run this on "
                    "the machine that sees the archive.")
    deliver.add_argument("--once", action="store_true", help="one pass, print what it did as JSON, and exit")
    deliver.add_argument("--retry-dead", nargs="?", const="", metavar="DESTINATION",
                         help="put dead-lettered deliveries (of DESTINATION, or all) back in the queue and exit")
    deliver.set_defaults(func=run_deliver)


def run_deliver(args: argparse.Namespace) -> int:
    from delivery.outbox import retry_dead
    from delivery.runner import OutboxRunner

    settings = settings_from_args(args)
    secure_data_dir(settings)  # the archive it reads and the reports it writes are PHI
    if args.retry_dead is None and not settings.dicom_destinations:
        raise ConfigurationError("no destination: set COVID_CXR_DICOM_DESTINATIONS (NAME=AE@HOST:PORT or "
                                 "NAME=folder:/PATH)")
    prepare_database(settings)
    if args.retry_dead is not None:
        count = retry_dead(settings, args.retry_dead or None)
        print(f"{count} dead-lettered deliveries back in the queue")
        return 0
    quiet_dicom_libraries()
    runner = OutboxRunner(settings)
    if args.once:
        report = runner.run_once()
        json.dump({"made": report.made, "delivered": report.delivered, "failed": report.failed,
                   "dead": report.dead}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    stopped = threading.Event()
    runner.start()
    try:
        with stop_on_signals(stopped.set):
            while not stopped.wait(1.0):
                pass
    finally:
        runner.stop()
    return 0
