"""The DICOM side of ``serve`` and ``ingest``: the C-STORE receiver when a port is set, the results outbox when
destinations are. Both run in threads of the process that owns the inbox and the archive."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from covid_cxr.settings import Settings
from delivery.runner import OutboxRunner, check_delivery_settings
from ingest.receiver import CallerPolicy, Receiver, start_receiver

log = logging.getLogger(__name__)

#: Libraries that log every PDU or copied attribute at INFO; only their warnings matter to an operator.
CHATTY_LOGGERS = ("pynetdicom", "highdicom")


def quiet_dicom_libraries() -> None:
    for name in CHATTY_LOGGERS:
        if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)


def check_dicom_settings(settings: Settings) -> None:
    """Fail fast, before anything starts, on a receiver without callers or an outbox without source files."""
    if settings.dicom_port is not None:
        CallerPolicy(settings.dicom_allowed_callers)
    check_delivery_settings(settings)


@dataclass
class DicomServices:
    """What :func:`start_dicom_services` started; :meth:`stop` stops it."""

    receiver: Receiver | None
    outbox: OutboxRunner | None

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        if self.outbox is not None:
            self.outbox.stop()


def start_dicom_services(settings: Settings) -> DicomServices:
    """Start the receiver (``COVID_CXR_DICOM_PORT`` set) and the outbox (``COVID_CXR_DICOM_DESTINATIONS`` set)."""
    check_dicom_settings(settings)
    quiet_dicom_libraries()
    receiver = start_receiver(settings) if settings.dicom_port is not None else None
    try:
        outbox = OutboxRunner(settings).start() if settings.dicom_destinations else None
    except BaseException:
        if receiver is not None:
            receiver.stop()
        raise
    return DicomServices(receiver, outbox)
