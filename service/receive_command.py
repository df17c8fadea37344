"""``covid-cxr receive``: the DICOM C-STORE SCP alone, storing what modalities and PACS send into the inbox."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from covid_cxr.commandline import Subparsers, settings_from_args
from service.dicom_services import quiet_dicom_libraries
from service.startup import secure_data_dir, stop_on_signals


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``receive``; `common` is the parent parser with the installation flags."""
    receive = subparsers.add_parser(
        "receive", parents=[common], help="DICOM C-STORE SCP: store received radiographs in the inbox",
        description="Accept associations from the allowed calling AE titles (COVID_CXR_DICOM_ALLOWED_CALLERS) and "
                    "store every CR, DX or secondary capture instance they send into the inbox, where `covid-cxr "
                    "ingest` or `serve` takes it. Answers C-ECHO. `serve` runs the same receiver when "
                    "COVID_CXR_DICOM_PORT is set.")
    receive.add_argument("--port", type=int, help="TCP port (COVID_CXR_DICOM_PORT; required here)")
    receive.add_argument("--ae-title", help="our AE title (COVID_CXR_DICOM_AE_TITLE; default COVID_CXR)")
    receive.add_argument("--bind", help="listen address (COVID_CXR_DICOM_BIND_ADDRESS; default 0.0.0.0)")
    receive.add_argument("--inbox", type=Path, help="where instances are stored (COVID_CXR_INBOX_DIR)")
    receive.set_defaults(func=run_receive)


def run_receive(args: argparse.Namespace) -> int:
    from ingest.receiver import start_receiver

    settings = settings_from_args(args, dicom_port=args.port, dicom_ae_title=args.ae_title,
                                  dicom_bind_address=args.bind, inbox_dir=args.inbox)
    secure_data_dir(settings)  # received instances are PHI; so is what the data dir will hold
    quiet_dicom_libraries()
    receiver = start_receiver(settings)
    stopped = threading.Event()
    try:
        with stop_on_signals(stopped.set):
            while not stopped.wait(1.0):
                pass
    finally:
        receiver.stop()
    return 0
