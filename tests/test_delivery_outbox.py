"""Tests for delivery/outbox.py, senders.py and runner.py: reports reach real DICOM destinations on 127.0.0.1.

Destinations are a pynetdicom SCP started by the test and DCMTK's storescp; a destination that is
down is a port nothing listens on. Time is passed in (``run_once(now)``), so backoffs of minutes
are tested without waiting for them.
"""

from __future__ import annotations

import io
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from dicom_results import (
    SMALL_CHEST,
    StoreSCP,
    chest_copy,
    free_port,
    ingest_files,
    predict,
    register_model,
    require_tools,
    run_tool,
)
from pydicom.uid import generate_uid
from service_fixtures import embedded_settings, wait_until
from sqlalchemy import select

from covid_cxr.settings import Settings
from db.migrate import upgrade
from db.models import Delivery, ResultDocument
from db.session import session_scope
from delivery.outbox import backoff_seconds, claim_due, lease_seconds
from delivery.runner import OutboxRunner


def with_destinations(settings: Settings, destinations: str, **overrides: object) -> Settings:
    return embedded_settings(settings.data_dir, database_url=settings.database_url, broker_url=settings.broker_url,
                             dicom_destinations=destinations, dicom_timeout_seconds=5, **overrides)


def add_studies(settings: Settings, dicom_dir: Path, images_per_study: list[int]) -> list[str]:
    """Studies of chest films, ingested and predicted; returns their StudyInstanceUIDs."""
    model_id = register_model(settings)
    study_uids = []
    for study_number, count in enumerate(images_per_study):
        study_uid = generate_uid()
        paths = [settings.inbox / f"s{study_number}-{i}.dcm" for i in range(count)]
        for path in paths:
            chest_copy(dicom_dir / SMALL_CHEST, path, study_uid=study_uid)
        predict(settings, ingest_files(settings, paths), [0.6] * count, model_id=model_id)
        study_uids.append(study_uid)
    return study_uids


def deliveries(settings: Settings) -> list[Delivery]:
    with session_scope(settings) as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)).all())


def test_one_report_per_study_reaches_a_dicom_destination(backend_settings, dicom_dir):
    with StoreSCP() as pacs:
        settings = with_destinations(backend_settings, f"pacs=PACS@127.0.0.1:{pacs.port}")
        study_uids = add_studies(settings, dicom_dir, [1, 2])
        report = OutboxRunner(settings).run_once()
        assert (len(report.made), report.delivered, report.failed) == (2, 2, {})
        assert sorted(d.StudyInstanceUID for d in pacs.received) == sorted(study_uids)
        assert OutboxRunner(settings).run_once().busy is False
    assert len(pacs.received) == 2
    with session_scope(settings) as session:
        stored = {row.sop_instance_uid: row.dataset for row in session.scalars(select(ResultDocument))}
    for received in pacs.received:
        assert received.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
        assert pydicom.dcmread(io.BytesIO(stored[received.SOPInstanceUID])) == received
    assert [(d.state, d.attempts) for d in deliveries(settings)] == [("delivered", 1), ("delivered", 1)]


def test_a_destination_down_for_a_while_gets_the_report_exactly_once(tmp_path, dicom_dir):
    port = free_port()
    settings = with_destinations(embedded_settings(tmp_path), f"pacs=PACS@127.0.0.1:{port}")
    upgrade(settings)
    add_studies(settings, dicom_dir, [1])
    runner = OutboxRunner(settings)
    start = datetime.now(UTC)

    first = runner.run_once(start)
    assert first.failed == {"destination_unreachable": 1}
    [row] = deliveries(settings)
    assert (row.state, row.attempts, row.reason) == ("pending", 1, "destination_unreachable")
    assert runner.run_once(start + timedelta(seconds=1)).busy is False  # still waiting its backoff
    second_try = start + timedelta(seconds=backoff_seconds(settings, 1) + 1)
    assert runner.run_once(second_try).failed == {"destination_unreachable": 1}

    with StoreSCP(port) as pacs:
        later = second_try + timedelta(seconds=backoff_seconds(settings, 2) + 1)
        assert runner.run_once(later).delivered == 1
        for extra in range(1, 4):
            assert runner.run_once(later + timedelta(hours=extra)).busy is False
    assert len(pacs.received) == 1
    [row] = deliveries(settings)
    assert (row.state, row.attempts, row.reason) == ("delivered", 3, None)


def test_after_the_last_attempt_a_delivery_is_dead_lettered_and_shown_by_status(tmp_path, dicom_dir, capsys):
    from service.cli import main

    settings = with_destinations(embedded_settings(tmp_path), f"pacs=PACS@127.0.0.1:{free_port()}",
                                 delivery_max_attempts=2)
    upgrade(settings)
    add_studies(settings, dicom_dir, [1])
    runner = OutboxRunner(settings)
    now = datetime.now(UTC)
    runner.run_once(now)
    assert runner.run_once(now + timedelta(hours=2)).dead == 1
    [row] = deliveries(settings)
    assert (row.state, row.attempts) == ("dead", 2)
    assert runner.run_once(now + timedelta(days=1)).busy is False  # a dead letter is never tried again by itself

    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "outbox       pending 0 · delivered 0 · dead 1" in text
    assert "dead letter" in text and "-> pacs after 2 attempt(s) destination_unreachable" in text
    assert main(["status", "--json", "--data-dir", str(tmp_path)]) == 0
    outbox = json.loads(capsys.readouterr().out)["outbox"]
    assert outbox["deliveries"]["dead"] == 1 and outbox["last_dead"]["reason"] == "destination_unreachable"

    assert main(["deliver", "--retry-dead", "--data-dir", str(tmp_path)]) == 0
    assert "1 dead-lettered deliveries back in the queue" in capsys.readouterr().out
    assert [(d.state, d.attempts) for d in deliveries(settings)] == [("pending", 0)]


def test_refusals_are_recorded_with_their_reason(tmp_path, dicom_dir):
    settings = embedded_settings(tmp_path)
    upgrade(settings)
    with StoreSCP(ae_title="PICKY", require_calling="SOMEONE_ELSE") as picky, StoreSCP(status=0xA700) as full:
        settings = with_destinations(settings, f"picky=PICKY@127.0.0.1:{picky.port},"
                                               f"full=FULL@127.0.0.1:{full.port}")
        add_studies(settings, dicom_dir, [1])
        report = OutboxRunner(settings).run_once()
    assert report.failed == {"association_rejected": 1, "store_failed": 1}
    reasons = {d.destination: (d.reason, d.message) for d in deliveries(settings)}
    assert "diagnostic 0x03" in reasons["picky"][1]  # calling AE title not recognised
    assert "0xA700" in reasons["full"][1]

    # A destination removed from the configuration: its rows are dead-lettered, not retried forever.
    gone = with_destinations(settings, f"out=folder:{tmp_path / 'out'}")
    assert OutboxRunner(gone).run_once(datetime.now(UTC) + timedelta(hours=1)).dead == 2
    assert {d.reason for d in deliveries(settings)} == {"unknown_destination"}


def test_two_senders_never_hold_the_same_delivery(tmp_path, dicom_dir):
    settings = with_destinations(embedded_settings(tmp_path), f"out=folder:{tmp_path / 'out'}")
    upgrade(settings)
    add_studies(settings, dicom_dir, [1])
    OutboxRunner(settings).maker.run_once()
    now = datetime.now(UTC)
    assert len(claim_due(settings, now)) == 1
    assert claim_due(settings, now) == []  # claimed: another sender sees nothing due
    assert len(claim_due(settings, now + timedelta(seconds=lease_seconds(settings) + 1))) == 1  # the first died


def test_dcmtk_storescp_as_the_destination(tmp_path, dicom_dir):
    require_tools("storescp", "dsrdump")
    received, port = tmp_path / "storescp", free_port()
    received.mkdir()
    storescp = subprocess.Popen(["storescp", "-aet", "STORESCP", "--output-directory", str(received), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        settings = with_destinations(embedded_settings(tmp_path), f"dcmtk=STORESCP@127.0.0.1:{port}")
        upgrade(settings)
        [study_uid] = add_studies(settings, dicom_dir, [2])
        runner = OutboxRunner(settings)
        wait_until(lambda: runner.run_once().delivered == 1, timeout=30, interval=0.2,
                   what="storescp to accept the report")
        [path] = wait_until(lambda: list(received.iterdir()), timeout=10, what="storescp to write the file")
    finally:
        storescp.terminate()
        storescp.wait(10)
    assert pydicom.dcmread(path).StudyInstanceUID == study_uid
    rendered = run_tool("dsrdump", str(path))
    assert rendered.returncode == 0 and "Suspected COVID-19" in rendered.stdout


@pytest.mark.parametrize("bad", ["pacs", "pacs=PACS@host", "a=A@h:1,a=B@h:2", "x=folder:/a,y=PACS@h:99999"])
def test_destinations_are_validated_at_start_up(tmp_path, bad):
    from covid_cxr.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="COVID_CXR_DICOM_DESTINATIONS"):
        embedded_settings(tmp_path, dicom_destinations=bad)


def test_deliver_once_from_the_command_line(tmp_path, dicom_dir, monkeypatch, capsys):
    from service.cli import main

    out = tmp_path / "out"
    monkeypatch.setenv("COVID_CXR_DICOM_DESTINATIONS", f"archive=folder:{out}")
    settings = embedded_settings(tmp_path)
    upgrade(settings)
    [study_uid] = add_studies(settings, dicom_dir, [1])
    assert main(["deliver", "--once", "--data-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (len(report["made"]), report["delivered"], report["failed"]) == (1, 1, {})
    [path] = (out / study_uid).iterdir()
    assert pydicom.dcmread(path).Modality == "SR"
    monkeypatch.delenv("COVID_CXR_DICOM_DESTINATIONS")
    assert main(["deliver", "--once", "--data-dir", str(tmp_path)]) == 1
    assert "COVID_CXR_DICOM_DESTINATIONS" in capsys.readouterr().err
