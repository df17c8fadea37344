"""The DICOM C-STORE SCP: stores received radiographs in the inbox, where the ingester takes them like any drop.

One handler per event, each doing one thing:

* ``EVT_REQUESTED``: reject an association whose calling AE title (and, when configured, address)
  is not on the allow-list, with A-ASSOCIATE-RJ "calling AE title not recognised".
* ``EVT_C_ECHO``: answer success (pynetdicom's default).
* ``EVT_C_STORE``: answer 0xA700 (out of resources) when the inbox's file system has less free
  space than configured; otherwise write the instance as received (no decoding) under a hidden
  temporary name beside its final place and move it into place without ever overwriting a file.
  From then on it is an ordinary inbox file: read, recorded, archived or quarantined by the
  ingester, with every reason code that applies to dropped files.

Only the storage classes of chest radiographs are negotiated (CR, DX for presentation and for
processing, secondary capture), each with every transfer syntax the installed pixel decoders read,
so a modality never sends an object the pipeline could not decode; other SOP classes are refused
at negotiation. May import: covid_cxr and this package; never the database.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import ssl
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from covid_cxr.errors import ConfigurationError
from covid_cxr.settings import Settings
from ingest.inbox import move_no_clobber

log = logging.getLogger(__name__)

#: Storage SOP classes whose instances can be chest radiographs (the reader decides per instance).
STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
#: The Verification SOP Class (C-ECHO).
VERIFICATION = UID("1.2.840.10008.1.1")
#: C-STORE statuses (PS3.4 Annex B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110
#: A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
#: Suffix of a file still being written (the watcher ignores it, and its name starts with a dot too).
PARTIAL_SUFFIX = ".part"

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def decodable_transfer_syntaxes() -> list[str]:
    """Every transfer syntax whose pixel data the installed pydicom decoders (pylibjpeg plugins included) decode."""
    syntaxes = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                syntaxes.append(str(uid))
        except NotImplementedError:
            continue
    return syntaxes


@dataclass(frozen=True)
class CallerPolicy:
    """Who may associate: calling AE titles, each from any address or from one (``AE@HOST``); ``*`` is any AE."""

    entries: frozenset[str]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ConfigurationError(
                "no calling AE title is allowed to send: set COVID_CXR_DICOM_ALLOWED_CALLERS, e.g. "
                "'MODALITY1,PACS@10.0.0.5' (or '*' to accept any AE title)")

    def allows(self, calling_ae_title: str, address: str) -> bool:
        title = calling_ae_title.strip()
        return "*" in self.entries or title in self.entries or f"{title}@{address}" in self.entries


@dataclass(frozen=True)
class StoredInstance:
    """Where a received instance went (for the log and for tests)."""

    path: Path
    calling_ae_title: str
    sop_instance_uid: str


class InstanceWriter:
    """Writes received datasets into the inbox: ``<inbox>/<calling AE>/<SOPInstanceUID>.dcm``.

    The file is written and fsynced under ``.<name>.<random>.part`` in the same folder (ignored by
    the watcher: a dot-name), then linked to the first free final name (``~1``, ``~2``... when the
    instance was sent before and is still waiting), so a half-written file is never seen and an
    earlier copy is never replaced.
    """

    def __init__(self, inbox: Path, min_free_bytes: int) -> None:
        self.inbox = inbox
        self.min_free_bytes = min_free_bytes

    def has_room(self) -> bool:
        self.inbox.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.inbox).free >= self.min_free_bytes

    def write(self, encoded: bytes, calling_ae_title: str, sop_instance_uid: str) -> Path:
        folder = self.inbox / (_SAFE_NAME.sub("_", calling_ae_title.strip()) or "_")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{sop_instance_uid}.dcm" if _UID.match(sop_instance_uid) else f"{uuid.uuid4().hex}.dcm"
        partial = folder / f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
        try:
            with open(partial, "wb") as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
            return move_no_clobber(partial, folder / name)
        finally:
            partial.unlink(missing_ok=True)


class StorageHandlers:
    """The receiver's event handlers, bound to one inbox and one caller policy."""

    def __init__(self, writer: InstanceWriter, callers: CallerPolicy) -> None:
        self.writer = writer
        self.callers = callers

    def handlers(self) -> list[EventHandlerType]:
        return [(evt.EVT_REQUESTED, self.on_requested), (evt.EVT_C_STORE, self.on_c_store)]

    def on_requested(self, event: evt.Event) -> None:
        """Reject callers not on the allow-list before anything is negotiated."""
        requestor = event.assoc.requestor
        assert requestor.primitive is not None  # EVT_REQUESTED: the A-ASSOCIATE request has arrived
        title, address = requestor.primitive.calling_ae_title, requestor.address
        if not self.callers.allows(title, address):
            log.warning("association from %s@%s rejected: calling AE title not allowed", title.strip(), address)
            # As pynetdicom's own rejections do: send A-ASSOCIATE-RJ, then wait for the peer to close.
            event.assoc.acse.send_reject(*REJECT_CALLING_AE)
            event.assoc.kill()

    def on_c_store(self, event: evt.Event) -> int:
        """Store one instance into the inbox; the status answers the caller (PS3.4 B.2.3)."""
        requestor = event.assoc.requestor
        title = requestor.ae_title.strip()
        request = event.request
        assert isinstance(request, C_STORE)
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        try:
            if not self.writer.has_room():
                log.error("C-STORE of %s from %s refused: less than %d MB free in %s", sop_instance_uid, title,
                          self.writer.min_free_bytes // 2**20, self.writer.inbox)
                return STATUS_OUT_OF_RESOURCES
            path = self.writer.write(event.encoded_dataset(), title, sop_instance_uid)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("C-STORE of %s from %s: disk full (%s)", sop_instance_uid, title, exc)
                return STATUS_OUT_OF_RESOURCES
            log.exception("C-STORE of %s from %s could not be written", sop_instance_uid, title)
            return STATUS_PROCESSING_FAILURE
        log.info("received %s from %s@%s -> %s", sop_instance_uid, title, requestor.address,
                 path.relative_to(self.writer.inbox))
        return STATUS_SUCCESS


def build_receiver(settings: Settings, inbox: Path | None = None) -> tuple[AE, StorageHandlers]:
    """The application entity and its handlers for ``settings`` (not started)."""
    callers = CallerPolicy(settings.dicom_allowed_callers)
    ae = AE(ae_title=settings.dicom_ae_title)
    ae.maximum_associations = settings.dicom_max_associations
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dicom_timeout_seconds
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION)
    syntaxes = decodable_transfer_syntaxes()
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    writer = InstanceWriter((inbox or settings.inbox).expanduser().resolve(), settings.dicom_min_free_mb * 2**20)
    return ae, StorageHandlers(writer, callers)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context from the certificate settings, or ``None`` when TLS is not configured."""
    if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.dicom_tls_cert, settings.dicom_tls_key)
        if settings.dicom_tls_ca is not None:
            context.load_verify_locations(settings.dicom_tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"the receiver's TLS certificate, key or CA cannot be loaded: {exc}") from exc
    return context


def start_receiver(settings: Settings, *, port: int | None = None, inbox: Path | None = None) -> Receiver:
    """Start the SCP in background threads; ``port`` overrides ``settings.dicom_port`` (0: any free port)."""
    port = settings.dicom_port if port is None else port
    if port is None:
        raise ConfigurationError("no port for the DICOM receiver: set COVID_CXR_DICOM_PORT or pass --port")
    ae, handlers = build_receiver(settings, inbox)
    context = tls_context(settings)
    try:
        server = ae.start_server((settings.dicom_bind_address, port), block=False, evt_handlers=handlers.handlers(),
                                 ssl_context=context)
    except OSError as exc:
        raise ConfigurationError(f"the DICOM receiver cannot listen on {settings.dicom_bind_address}:{port}: {exc}"
                                 ) from exc
    assert server is not None  # block=False returns the running server
    receiver = Receiver(ae, server, handlers.writer.inbox, tls=context is not None)
    log.info("DICOM receiver %s listening on %s:%d%s, storing into %s; callers allowed: %s", settings.dicom_ae_title,
             settings.dicom_bind_address, receiver.port, " (TLS)" if receiver.tls else "", receiver.inbox,
             ", ".join(sorted(handlers.callers.entries)))
    return receiver


@dataclass
class Receiver:
    """A running SCP; :meth:`stop` closes the port and waits for open associations."""

    ae: AE
    server: ThreadedAssociationServer
    inbox: Path
    tls: bool

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def quiet_network_log(levels: Iterable[str] = ("pynetdicom",)) -> None:
    """pynetdicom logs every PDU at INFO; only its warnings matter to an operator."""
    for name in levels:
        logging.getLogger(name).setLevel(logging.WARNING)
