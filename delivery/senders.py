"""Senders: put documents at a destination, a DICOM storage SCP (C-STORE) or a folder, and say how each went.

A sender never raises for a failed delivery; it returns one :class:`Outcome` per document, with
a reason code from :class:`~covid_cxr.reasons.Reason` (kind ``delivery``), which the outbox stores and counts.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, EnhancedSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from covid_cxr.reasons import Reason
from covid_cxr.settings import Destination, Settings

log = logging.getLogger(__name__)

#: C-STORE statuses that mean "stored": success and the warnings of PS3.4 B.2.3 (coercion, elements discarded).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
#: The SR storage classes a destination is offered, with the two uncompressed syntaxes every SCP must take.
SR_CONTEXTS = (ComprehensiveSRStorage, EnhancedSRStorage)
SR_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass(frozen=True)
class Outcome:
    """How one document went: delivered, or the reason code and message of the failure."""

    delivered: bool
    reason: Reason | None = None
    message: str | None = None

    @classmethod
    def failed(cls, reason: Reason, message: str) -> Outcome:
        return cls(False, reason, message)


def send(settings: Settings, destination: Destination, documents: Sequence[tuple[int, Dataset]]) -> dict[int, Outcome]:
    """Send ``documents`` (``(key, dataset)``) to ``destination``; returns each key's :class:`Outcome`."""
    if destination.kind == "folder":
        return {key: write_to_folder(destination, document) for key, document in documents}
    return store_over_network(settings, destination, documents)


def write_to_folder(destination: Destination, document: Dataset) -> Outcome:
    """``<folder>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, written under a dot-name and renamed into place.

    The same document written twice replaces itself with identical bytes, so a retry is harmless.
    """
    assert destination.folder is not None
    target = destination.folder / str(document.StudyInstanceUID) / f"{document.SOPInstanceUID}.dcm"
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        document.save_as(partial, enforce_file_format=True)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        return Outcome.failed(Reason.WRITE_FAILED, f"{target}: {exc}")
    return Outcome(True)


def store_over_network(settings: Settings, destination: Destination,
                       documents: Sequence[tuple[int, Dataset]]) -> dict[int, Outcome]:
    """One association with ``destination``, one C-STORE per document; a failed association fails them all."""
    ae = AE(ae_title=settings.dicom_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dicom_timeout_seconds
    ae.connection_timeout = settings.dicom_timeout_seconds
    for sop_class in SR_CONTEXTS:
        ae.add_requested_context(sop_class, SR_TRANSFER_SYNTAXES)
    assert destination.host is not None and destination.port is not None and destination.ae_title is not None
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            primitive = assoc.acceptor.primitive
            failure = Outcome.failed(
                Reason.ASSOCIATION_REJECTED,
                f"{where} rejected the association (result 0x{primitive.result:02X}, source "
                f"0x{primitive.result_source:02X}, diagnostic 0x{primitive.diagnostic:02X})")
        else:
            failure = Outcome.failed(Reason.DESTINATION_UNREACHABLE,
                                     f"no association with {where} (connection refused, timed out or aborted)")
        return {key: failure for key, _ in documents}
    try:
        return {key: _store(assoc, where, document) for key, document in documents}
    finally:
        if assoc.is_established:
            assoc.release()


def _store(assoc: Association, where: str, document: Dataset) -> Outcome:
    try:
        status = assoc.send_c_store(document)
    except ValueError as exc:  # no accepted presentation context for this SOP class and transfer syntax
        return Outcome.failed(Reason.SR_NOT_ACCEPTED, f"{where}: {exc}")
    except RuntimeError as exc:  # the association ended under us
        return Outcome.failed(Reason.NO_RESPONSE, f"{where}: {exc}")
    if not status or "Status" not in status:
        return Outcome.failed(Reason.NO_RESPONSE,
                              f"{where} sent no C-STORE response (association aborted or timed out)")
    code = int(status.Status)
    if code not in STORED_STATUSES:
        comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
        return Outcome.failed(Reason.STORE_FAILED, f"{where} answered C-STORE with 0x{code:04X}{comment}")
    if code != 0x0000:
        log.warning("%s stored %s with warning status 0x%04X", where, document.SOPInstanceUID, code)
    return Outcome(True)
