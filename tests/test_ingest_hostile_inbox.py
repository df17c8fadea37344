"""Hostile inbox entries: links, special files, odd names, unreadable paths and writers that pause.

Each ends in a visible state (a row with a reason, or a listed stuck entry), nothing outside the
data dir is touched, and a cause is logged once, not on every retry.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from service_fixtures import RecordingPublisher as Publisher
from service_fixtures import RunningIngester, wait_until
from sqlalchemy import select

from covid_cxr.settings import load_settings
from db.migrate import upgrade
from db.models import Instance
from db.session import session_scope
from ingest.decode_pool import DecodePool
from ingest.inbox import NAME_MAX, read_reason
from ingest.service import IngestService
from ingest.stuck import stuck_files

CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"
HIP = "pylibjpeg-data__RG2_JPLY_fixed.dcm"


@pytest.fixture
def settings(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", settle_seconds=0.3, batch_size=2, batch_max_wait_seconds=0.3,
                             reconcile_interval_seconds=0.5)
    upgrade(settings)
    settings.inbox.mkdir(parents=True)
    return settings


@pytest.fixture
def service(settings):
    return IngestService(settings, enqueue=Publisher().enqueue, requeue=Publisher().requeue)


def running(service: IngestService) -> RunningIngester:
    return RunningIngester(service.settings, service)


def _rows(settings) -> list[Instance]:
    with session_scope(settings) as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)).all())


def _stuck(settings) -> dict[str, str]:
    return {entry["file_name"]: entry["cause"] for entry in stuck_files(settings)}


def test_a_link_is_never_followed_and_is_listed_as_stuck(settings, service, dicom_dir, tmp_path, caplog):
    outside = tmp_path / "outside.dcm"
    shutil.copyfile(dicom_dir / CHEST, outside)
    before = outside.read_bytes()
    (settings.inbox / "link.dcm").symlink_to(outside)
    (settings.inbox / "folder-link").symlink_to(tmp_path, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="ingest.service"), running(service):
        wait_until(lambda: _stuck(settings) == {"link.dcm": "not_a_regular_file",
                                                "folder-link": "not_a_regular_file"}, timeout=20,
                   what="both links listed as stuck")
        time.sleep(1.5)  # a few reconciliation rounds: the cause is still logged once
    assert outside.read_bytes() == before and not outside.is_symlink()
    assert (settings.inbox / "link.dcm").is_symlink(), "left where it is"
    assert _rows(settings) == [] and not settings.archive.exists()
    warnings = [r for r in caplog.records if "stuck (not_a_regular_file)" in r.getMessage()]
    assert len(warnings) == 2  # one per entry, not one per retry
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.WARNING)


def test_a_file_swapped_for_a_link_while_it_is_read_is_not_moved(settings, service, dicom_dir, tmp_path,
                                                                  monkeypatch):
    outside = tmp_path / "outside.dcm"
    shutil.copyfile(dicom_dir / CHEST, outside)
    path = settings.inbox / "swap.dcm"
    shutil.copyfile(dicom_dir / CHEST, path)
    real_results = DecodePool.results

    def results_then_swap(pool):
        ready = real_results(pool)
        if ready:  # an attacker swaps the claimed entry between the read and the move
            [claimed] = list(service.claims.held())
            claimed.path.unlink()
            claimed.path.symlink_to(outside)
        return ready

    monkeypatch.setattr(DecodePool, "results", results_then_swap)
    service._process_claimed(path)
    monkeypatch.undo()
    assert _rows(settings) == [] and not settings.archive.exists()
    assert path.is_symlink() and outside.is_file() and not outside.is_symlink()
    service._process_claimed(path)  # next round: the link itself is listed, never followed
    assert _stuck(settings) == {"swap.dcm": "not_a_regular_file"}


def test_special_files_and_odd_names_each_end_in_a_visible_state(settings, service, dicom_dir):
    os.mkfifo(settings.inbox / "pipe.dcm")
    long_name = "r" * NAME_MAX  # a rejected file whose marker name would be too long
    shutil.copyfile(dicom_dir / HIP, settings.inbox / long_name)
    odd = os.fsencode(settings.inbox) + b"/caf\xe9 \x1b[2J\nforged.dcm"  # not UTF-8, escapes, a newline
    shutil.copyfile(dicom_dir / CHEST, odd)
    with running(service):
        wait_until(lambda: len(_rows(settings)) == 2 and _stuck(settings), timeout=20, what="two rows, one stuck")
    assert _stuck(settings) == {"pipe.dcm": "not_a_regular_file"}
    names = {row.file_name: row for row in _rows(settings)}
    assert names[long_name].reason == "wrong_body_part"
    [quarantined] = [p for p in settings.quarantine.iterdir() if not p.name.endswith(".reason.json")]
    assert read_reason(quarantined)["reason"] == "wrong_body_part"
    escaped = "caf\\xe9 \x1b[2J\nforged.dcm"
    assert names[escaped].state == "received", "a non-UTF-8 name is stored with its bytes escaped"


def test_a_path_past_path_max_is_listed_not_dropped(settings, service, dicom_dir):
    fd = os.open(settings.inbox, os.O_RDONLY)
    try:
        for _ in range(18):  # 18 × 256 bytes: past Linux's 4096-byte PATH_MAX
            os.mkdir("d" * 250, dir_fd=fd)
            child = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("deep.dcm", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as handle:
            handle.write((dicom_dir / CHEST).read_bytes())
    finally:
        os.close(fd)
    with running(service):
        wait_until(lambda: _stuck(settings), timeout=20, what="the deep file listed as stuck")
    [(name, cause)] = _stuck(settings).items()
    assert cause == "name_too_long" and name.startswith("d" * 250)  # the deepest folder it can name


def test_a_writer_that_pauses_cannot_change_the_quarantined_copy_nor_block_the_complete_one(settings, dicom_dir):
    data = (dicom_dir / CHEST).read_bytes()
    path = settings.inbox / "slow.dcm"
    publisher = Publisher()
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    with open(path, "wb") as writer:
        writer.write(data[: len(data) // 2])
        writer.flush()
        with running(service):
            wait_until(lambda: _rows(settings), timeout=20, what="the half-written file judged")
            writer.write(data[len(data) // 2:])  # the writer wakes up and finishes its inode
            writer.flush()
    [truncated] = _rows(settings)
    assert truncated.reason == "truncated"
    quarantined = Path(truncated.stored_path)
    assert quarantined.read_bytes() == data[: len(data) // 2], "the quarantined copy is what was judged"
    assert read_reason(quarantined)["sha256"] == truncated.file_sha256
    shutil.copyfile(dicom_dir / CHEST, settings.inbox / "complete.dcm")  # the sender sends it again
    with running(IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)):
        wait_until(lambda: len(_rows(settings)) == 2, timeout=20, what="the complete copy")
    complete = _rows(settings)[1]
    assert (complete.state, complete.reason, complete.conflict) == ("received", None, False)
    assert complete.sop_instance_uid == truncated.sop_instance_uid


def test_stored_files_are_private(settings, service, dicom_dir):
    source = settings.inbox / "a.dcm"
    shutil.copyfile(dicom_dir / CHEST, source)
    os.chmod(source, 0o644)  # as a sender's umask left it
    shutil.copyfile(dicom_dir / HIP, settings.inbox / "hip.dcm")
    with running(service):
        wait_until(lambda: len(_rows(settings)) == 2, timeout=20, what="both files")
    for row in _rows(settings):
        assert Path(row.stored_path).stat().st_mode & 0o077 == 0, row.file_name
