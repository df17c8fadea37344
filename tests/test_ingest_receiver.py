"""Tests for ingest/receiver.py: a real C-STORE SCP on 127.0.0.1, driven by DCMTK's echoscu/storescu and pynetdicom.

Nothing of pynetdicom is mocked: every test opens real associations on a port the receiver picked.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_results import require_tools, run_tool
from pydicom.uid import ComprehensiveSRStorage, ComputedRadiographyImageStorage, generate_uid
from pynetdicom import AE
from service_fixtures import RunningIngester, embedded_settings, wait_until
from sqlalchemy import select

from covid_cxr.errors import ConfigurationError
from covid_cxr.settings import Settings
from db.migrate import upgrade
from db.models import Instance
from db.session import session_scope
from ingest.receiver import (
    STATUS_OUT_OF_RESOURCES,
    CallerPolicy,
    Receiver,
    start_receiver,
)

AE_TITLE = "COVID_CXR"
#: Allowed: DCMTK's tools and pynetdicom, and one AE only from an address the tests never use.
CALLERS = "STORESCU,ECHOSCU,PYNETDICOM,REMOTE_ONLY@10.255.255.1"
SMALL_CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"
SIIM_JPEG = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
J2K_LOSSLESS = "pylibjpeg-data__966_fixed.dcm"
MR_RLE = "dcmfx-pydicom__MR_small_RLE.dcm"


def receiver_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"dicom_allowed_callers": CALLERS, "dicom_bind_address": "127.0.0.1",
                                 "dicom_ae_title": AE_TITLE, "dicom_timeout_seconds": 10, **overrides}
    return embedded_settings(tmp_path / "data", inbox_dir=tmp_path / "inbox", **values)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    running = start_receiver(receiver_settings(tmp_path), port=0)
    try:
        yield running
    finally:
        running.stop()


def scu(title: str = "PYNETDICOM") -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def received_files(inbox: Path) -> list[Path]:
    return sorted(p for p in inbox.rglob("*") if p.is_file())


def test_c_echo_answers_and_unknown_callers_are_rejected_at_association(receiver):
    require_tools("echoscu")
    port = str(receiver.port)
    assert run_tool("echoscu", "-aet", "ECHOSCU", "-aec", AE_TITLE, "127.0.0.1", port).returncode == 0
    unknown = run_tool("echoscu", "-aet", "INTRUDER", "-aec", AE_TITLE, "127.0.0.1", port)
    assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stdout, unknown.stdout
    # Allowed by title but only from another address.
    elsewhere = run_tool("echoscu", "-aet", "REMOTE_ONLY", "-aec", AE_TITLE, "127.0.0.1", port)
    assert elsewhere.returncode != 0 and "Calling AE Title Not Recognized" in elsewhere.stdout
    misaddressed = run_tool("echoscu", "-aet", "ECHOSCU", "-aec", "SOMEONE_ELSE", "127.0.0.1", port)
    assert misaddressed.returncode != 0 and "Called AE Title Not Recognized" in misaddressed.stdout
    assert received_files(receiver.inbox) == []


def test_storescu_and_pynetdicom_store_instances_into_the_inbox(receiver, dicom_dir):
    require_tools("storescu")
    port = str(receiver.port)
    # DCMTK proposes uncompressed syntaxes by default, JPEG baseline with -xy (the file's own syntax).
    assert run_tool("storescu", "-aet", "STORESCU", "-aec", AE_TITLE, "127.0.0.1", port,
                    str(dicom_dir / SMALL_CHEST)).returncode == 0
    sent = run_tool("storescu", "-xy", "-aet", "STORESCU", "-aec", AE_TITLE, "127.0.0.1", port,
                    str(dicom_dir / SIIM_JPEG))
    assert sent.returncode == 0, sent.stdout
    source = pydicom.dcmread(dicom_dir / J2K_LOSSLESS)
    ae = scu()
    ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dicom_dir / J2K_LOSSLESS).Status == 0x0000
        assert assoc.send_c_store(dicom_dir / J2K_LOSSLESS).Status == 0x0000  # sent again: kept, not replaced
    finally:
        assoc.release()

    files = received_files(receiver.inbox)
    names = [p.relative_to(receiver.inbox).as_posix() for p in files]
    expected = {f"STORESCU/{pydicom.dcmread(dicom_dir / name).SOPInstanceUID}.dcm" for name in (SMALL_CHEST, SIIM_JPEG)}
    assert expected <= set(names)
    assert {f"PYNETDICOM/{source.SOPInstanceUID}.dcm", f"PYNETDICOM/{source.SOPInstanceUID}~1.dcm"} <= set(names)
    assert len(names) == 4, names  # no temporary file left behind
    for path in files:  # what arrived is the instance that was sent, in its own transfer syntax
        stored = pydicom.dcmread(path)
        original = next(pydicom.dcmread(dicom_dir / name) for name in (SMALL_CHEST, SIIM_JPEG, J2K_LOSSLESS)
                        if pydicom.dcmread(dicom_dir / name, stop_before_pixels=True).SOPInstanceUID
                        == stored.SOPInstanceUID)
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.PixelData == original.PixelData


def test_a_non_image_sop_class_is_refused_at_negotiation(receiver, dicom_dir, tmp_path):
    require_tools("storescu")
    refused = run_tool("storescu", "-aet", "STORESCU", "-aec", AE_TITLE, "127.0.0.1", str(receiver.port),
                       str(dicom_dir / MR_RLE))
    assert refused.returncode != 0 and "No presentation context" in refused.stdout, refused.stdout
    ae = scu()
    ae.add_requested_context(ComprehensiveSRStorage)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        contexts = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assert set(contexts) == {ComprehensiveSRStorage}
        report = pydicom.Dataset()
        report.SOPClassUID, report.SOPInstanceUID = ComprehensiveSRStorage, generate_uid()
        report.file_meta = pydicom.dataset.FileMetaDataset()
        report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(report)
    finally:
        assoc.release()
    assert received_files(receiver.inbox) == []


def test_too_little_free_space_answers_out_of_resources(tmp_path, dicom_dir):
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    running = start_receiver(receiver_settings(tmp_path, dicom_min_free_mb=free_mb + 1024), port=0)
    try:
        ae = scu()
        ae.add_requested_context(ComputedRadiographyImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", running.port, ae_title=AE_TITLE)
        assert assoc.is_established
        try:
            assert assoc.send_c_store(dicom_dir / SMALL_CHEST).Status == STATUS_OUT_OF_RESOURCES
        finally:
            assoc.release()
        assert received_files(running.inbox) == []
    finally:
        running.stop()


def test_associations_beyond_the_maximum_are_refused(tmp_path):
    running = start_receiver(receiver_settings(tmp_path, dicom_max_associations=1), port=0)
    try:
        first, second = scu(), scu()
        for ae in (first, second):
            ae.add_requested_context("1.2.840.10008.1.1")
        held = first.associate("127.0.0.1", running.port, ae_title=AE_TITLE)
        assert held.is_established
        try:
            refused = second.associate("127.0.0.1", running.port, ae_title=AE_TITLE)
            assert refused.is_rejected
        finally:
            held.release()
    finally:
        running.stop()


def test_tls_only_when_configured(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    running = start_receiver(receiver_settings(tmp_path, dicom_tls_cert=cert, dicom_tls_key=key), port=0)
    try:
        assert running.tls
        ae = scu()
        ae.add_requested_context("1.2.840.10008.1.1")
        client = ssl.create_default_context(cafile=str(cert))
        assoc = ae.associate("127.0.0.1", running.port, ae_title=AE_TITLE, tls_args=(client, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        plain = ae.associate("127.0.0.1", running.port, ae_title=AE_TITLE)
        assert not plain.is_established
    finally:
        running.stop()


def test_configuration_errors_stop_the_receiver_before_it_listens(tmp_path):
    with pytest.raises(ConfigurationError, match="COVID_CXR_DICOM_ALLOWED_CALLERS"):
        start_receiver(receiver_settings(tmp_path, dicom_allowed_callers=""), port=0)
    with pytest.raises(ConfigurationError, match="COVID_CXR_DICOM_PORT"):
        start_receiver(receiver_settings(tmp_path))
    assert CallerPolicy(frozenset({"*"})).allows("ANYONE", "192.0.2.1")
    assert not CallerPolicy(frozenset({"A@192.0.2.1"})).allows("A", "192.0.2.2")


def test_received_instances_are_ingested_like_dropped_files(tmp_path, dicom_dir):
    require_tools("storescu")
    settings = receiver_settings(tmp_path, settle_seconds=0.2, reconcile_interval_seconds=1.0)
    upgrade(settings)
    running = start_receiver(settings, port=0)
    try:
        with RunningIngester(settings):
            sent = run_tool("storescu", "-aet", "STORESCU", "-aec", AE_TITLE, "127.0.0.1", str(running.port),
                            str(dicom_dir / SMALL_CHEST))
            assert sent.returncode == 0, sent.stdout
            uid = pydicom.dcmread(dicom_dir / SMALL_CHEST, stop_before_pixels=True).SOPInstanceUID

            def recorded() -> Instance | None:
                with session_scope(settings) as session:
                    return session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).first()

            row = wait_until(recorded, timeout=30, what="the received instance to be recorded")
    finally:
        running.stop()
    assert row.file_name == f"STORESCU/{uid}.dcm"
    assert row.state in {"received", "queued"} and row.modality == "CR"
    assert Path(row.stored_path or "").is_file() and received_files(settings.inbox) == []
