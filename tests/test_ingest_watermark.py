"""The free-disk watermark: ingest pauses below one level and resumes above the other; files wait, nothing is lost.

The drill uses the real file system: levels just below its current free space and a real ballast
file (``posix_fallocate``) that takes the free space below them, then is removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from service_fixtures import RunningIngester, embedded_settings, wait_until

from covid_cxr.errors import ConfigurationError
from covid_cxr.settings import load_settings
from db.migrate import upgrade
from ingest.watermark import MIB, DiskReading, DiskWatermark, least_free, watched_folders
from service.cli import main
from worker.results import status_report

CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"
SIIM = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def test_two_levels_pause_below_one_and_resume_above_the_other(tmp_path):
    settings = load_settings(data_dir=tmp_path, ingest_pause_below_free_mb=100, ingest_resume_above_free_mb=200)
    free = iter([500, 99, 150, 199, 201, 150, 99])
    watermark = DiskWatermark(settings, measure=lambda: DiskReading(tmp_path, next(free) * MIB), check_every=0)
    changes: list[bool] = []
    watermark.on_change = lambda w: changes.append(w.is_paused)
    assert [watermark.paused() for _ in range(7)] == [False, True, True, True, False, False, True]
    assert changes == [False, True, False, True], "the first measurement, then each pause and resume"
    assert "below 100 MiB" in watermark.message() and "more than 200 MiB" in watermark.message()


def test_status_shows_the_free_space_soon_after_start_not_at_the_next_reconciliation(tmp_path):
    settings = embedded_settings(tmp_path / "data", inbox_dir=tmp_path / "inbox", reconcile_interval_seconds=600)
    upgrade(settings)
    with RunningIngester(settings):
        wait_until(lambda: any(row["free_mb"] is not None for row in status_report(settings)["ingest"]["ingesters"]),
                   timeout=10, what="the measured free space in the ingest status row")
        [row] = status_report(settings)["ingest"]["ingesters"]
    assert "MiB free on" in row["message"]


def test_the_resume_level_must_not_lie_below_the_pause_level(tmp_path):
    with pytest.raises(ConfigurationError, match="COVID_CXR_INGEST_RESUME_ABOVE_FREE_MB: .*at least"):
        load_settings(data_dir=tmp_path, ingest_pause_below_free_mb=300, ingest_resume_above_free_mb=200)


def test_free_space_is_measured_where_ingest_writes_even_before_the_folders_exist(tmp_path):
    settings = load_settings(data_dir=tmp_path / "not-yet")
    reading = least_free(watched_folders(settings))
    stats = os.statvfs(tmp_path)
    assert reading.path == tmp_path
    assert abs(reading.free_bytes - stats.f_bavail * stats.f_frsize) < 64 * MIB


def test_ingest_pauses_on_a_full_disk_and_resumes_without_losing_a_file(tmp_path, dicom_dir, capsys):
    data = tmp_path / "data"
    free = least_free([tmp_path]).free_bytes
    if free < 4096 * MIB:
        pytest.skip("needs 4 GiB of free disk for the ballast file")
    # Levels just below today's free space: a 2 GiB ballast goes below the first, removing it rises above the second.
    pause, resume = (free - 1024 * MIB) // MIB, (free - 512 * MIB) // MIB
    settings = embedded_settings(data, inbox_dir=tmp_path / "inbox", settle_seconds=0.5,
                                 reconcile_interval_seconds=1.0, ingest_pause_below_free_mb=pause,
                                 ingest_resume_above_free_mb=resume)
    upgrade(settings)
    ballast = data / "ballast"
    with RunningIngester(settings) as ingester:
        wait_until(lambda: status_report(settings)["ingest"]["ingesters"], timeout=20, what="the ingest status row")
        assert status_report(settings)["ingest"]["paused"] is False

        descriptor = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(descriptor, 0, 2048 * MIB)
        finally:
            os.close(descriptor)
        try:
            wait_until(lambda: status_report(settings)["ingest"]["paused"], timeout=20, what="ingest to pause")
            for name in (CHEST, SIIM):
                shutil.copyfile(dicom_dir / name, settings.inbox / name)
            wait_until(lambda: ingester.watcher.waiting == 2, timeout=20, what="the files to be seen")
            ingester.watcher.wait(3.0)  # settled long ago: only the pause keeps them here
            assert sorted(p.name for p in settings.inbox.iterdir()) == sorted([CHEST, SIIM])
            assert status_report(settings)["instances"]["total"] == 0
            assert main(["status", "--data-dir", str(data)]) == 0
            text = capsys.readouterr().out
            assert "PAUSED" in text and "files wait in the inbox" in text
        finally:
            ballast.unlink()
        wait_until(lambda: status_report(settings)["instances"]["total"] == 2, timeout=30,
                   what="the waiting files to be ingested after the space came back")
        assert status_report(settings)["ingest"]["paused"] is False
        assert list(Path(settings.inbox).iterdir()) == []
    assert status_report(settings)["ingest"]["ingesters"] == [], "a stopped ingester removes its row"
