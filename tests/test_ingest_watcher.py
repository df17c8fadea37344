"""The inbox watcher: settle logic, ignored names and folders, scans, claims, both observers."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from ingest.watcher import InboxWatcher, is_ignored_name

CHEST = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
BIG_CHEST = "pylibjpeg-data__RG1_JLSN.dcm"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _collect(watcher: InboxWatcher, until: float, want: int = 1) -> list[Path]:
    """take_ready() until ``want`` files came out or ``until`` seconds passed."""
    taken: list[Path] = []
    deadline = time.monotonic() + until
    while time.monotonic() < deadline and len(taken) < want:
        taken += watcher.take_ready()
        watcher.wait(0.05)
    return taken


def test_settle_timer_restarts_on_every_change(tmp_path, dicom_dir):
    clock = FakeClock()
    watcher = InboxWatcher(tmp_path, settle_seconds=2.0, clock=clock, wall_clock=clock)
    path = tmp_path / "a.dcm"
    path.write_bytes((dicom_dir / CHEST).read_bytes()[:1000])
    assert watcher.scan() == 1
    clock.now += 1.9
    assert watcher.take_ready() == []
    with open(path, "ab") as handle:  # the writer is still going
        handle.write(b"\0" * 10)
    clock.now += 0.2
    assert watcher.take_ready() == []  # change seen: timer restarts now
    clock.now += 1.9
    assert watcher.take_ready() == []
    clock.now += 0.2
    assert watcher.take_ready() == [path.resolve()]
    assert watcher.seconds_until_next_check() is None


def test_ignored_names():
    assert is_ignored_name(["a.part"]) and is_ignored_name(["A.TMP"]) and is_ignored_name([".hidden"])
    assert is_ignored_name([".staging", "x.dcm"])
    assert not is_ignored_name(["site", "IM0001"]) and not is_ignored_name(["1.2.840.5.dcm"])


def test_scan_skips_temporary_hidden_and_own_folders(tmp_path, dicom_dir):
    inbox = tmp_path / "inbox"
    for rel in ["good.dcm", "sub/also-good", "x.part", "y.tmp", ".z", ".rsync/q.dcm", "archive/old.dcm",
                "quarantine/bad.dcm"]:
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dicom_dir / CHEST, inbox / rel)
    clock = FakeClock()
    watcher = InboxWatcher(inbox, settle_seconds=1.0, clock=clock, wall_clock=clock,
                           ignore_dirs=[inbox / "archive", inbox / "quarantine"])
    assert watcher.scan() == 2
    clock.now += 1.0
    ready = sorted(p.relative_to(inbox.resolve()).as_posix() for p in watcher.take_ready())
    assert ready == ["good.dcm", "sub/also-good"]


def test_slow_writer_is_taken_only_once_complete(tmp_path, dicom_dir):
    data = (dicom_dir / BIG_CHEST).read_bytes()
    target = tmp_path / "slow.dcm"
    finished = threading.Event()

    def slow_writer() -> None:
        chunk = len(data) // 8 + 1
        with open(target, "wb") as handle:
            for start in range(0, len(data), chunk):
                handle.write(data[start:start + chunk])
                handle.flush()
                time.sleep(0.15)
        finished.set()

    with InboxWatcher(tmp_path, settle_seconds=0.5) as watcher:
        writer = threading.Thread(target=slow_writer)
        writer.start()
        taken: list[Path] = []
        deadline = time.monotonic() + 20
        while not taken and time.monotonic() < deadline:
            taken = watcher.take_ready()
            assert not taken or finished.is_set(), "handed out while the writer was still writing"
            watcher.wait(0.05)
        writer.join()
    assert taken == [target.resolve()]
    assert target.read_bytes() == data


def test_reads_of_inbox_files_send_the_handler_no_events(tmp_path, monkeypatch):
    """Decode processes read every claimed file: those opens and closes must not cost the watcher's thread
    a dispatch each (inotify is asked for the events the handler acts on, nothing more)."""
    import ingest.watcher as watcher_module

    seen: list[str] = []
    handled = watcher_module._Handler.on_any_event

    def counting(self: watcher_module._Handler, event: object) -> None:
        seen.append(f"{event.event_type}:{Path(os.fsdecode(event.src_path)).name}")  # type: ignore[attr-defined]
        handled(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(watcher_module._Handler, "on_any_event", counting)
    inbox = tmp_path / "inbox"
    claimed = inbox / ".claims" / "host-1"
    claimed.mkdir(parents=True)
    (claimed / "study.dcm").write_bytes(b"x" * 4096)
    with InboxWatcher(inbox, settle_seconds=60) as watcher:
        time.sleep(0.2)
        for _ in range(50):
            (claimed / "study.dcm").read_bytes()
        time.sleep(1.0)  # watchdog holds events up to 0.5 s to pair moves
        assert seen == [], f"reads were dispatched: {seen[:5]}"
        (inbox / "written.dcm").write_bytes(b"y" * 4096)  # written in place: still seen by its events
        deadline = time.monotonic() + 5
        while "closed:written.dcm" not in seen and time.monotonic() < deadline:
            watcher.wait(0.05)
    assert {"created:written.dcm", "closed:written.dcm"} <= set(seen)


def _written_an_hour_ago(path: Path) -> None:
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))


def test_renamed_into_place_is_ready_at_once(tmp_path, dicom_dir):
    with InboxWatcher(tmp_path / "inbox", settle_seconds=60) as watcher:
        staging = tmp_path / "inbox" / "study.dcm.part"
        shutil.copyfile(dicom_dir / CHEST, staging)
        os.rename(staging, staging.with_name("study.dcm"))
        taken = _collect(watcher, 5.0)
    assert [p.name for p in taken] == ["study.dcm"]


def test_moved_in_from_elsewhere_is_ready_by_its_old_mtime(tmp_path, dicom_dir):
    staging = tmp_path / "export"
    (staging / "series1").mkdir(parents=True)
    for i in range(3):
        shutil.copyfile(dicom_dir / CHEST, staging / "series1" / f"IM{i}")
        _written_an_hour_ago(staging / "series1" / f"IM{i}")
    single = tmp_path / "single.dcm"
    shutil.copyfile(dicom_dir / CHEST, single)
    _written_an_hour_ago(single)
    with InboxWatcher(tmp_path / "inbox", settle_seconds=60) as watcher:
        os.rename(staging, tmp_path / "inbox" / "export")
        os.rename(single, tmp_path / "inbox" / "single.dcm")
        taken = _collect(watcher, 5.0, want=4)
    assert sorted(p.name for p in taken) == ["IM0", "IM1", "IM2", "single.dcm"]


def test_polling_mode_does_not_trust_mtimes(tmp_path, dicom_dir):
    clock = FakeClock()
    path = tmp_path / "share.dcm"
    shutil.copyfile(dicom_dir / CHEST, path)
    _written_an_hour_ago(path)
    watcher = InboxWatcher(tmp_path, settle_seconds=5.0, polling=True, clock=clock)
    watcher.scan()
    assert watcher.take_ready() == []
    clock.now += 5.0
    assert watcher.take_ready() == [path.resolve()]


def test_polling_observer_for_network_shares(tmp_path, dicom_dir):
    with InboxWatcher(tmp_path, settle_seconds=0.3, polling=True) as watcher:
        shutil.copyfile(dicom_dir / CHEST, tmp_path / "a.dcm")
        taken = _collect(watcher, 10.0)
    assert taken == [(tmp_path / "a.dcm").resolve()]


def test_a_claimed_file_is_handed_out_once(tmp_path, dicom_dir):
    clock = FakeClock()
    watcher = InboxWatcher(tmp_path, settle_seconds=0.0, clock=clock, wall_clock=clock)
    path = tmp_path / "a.dcm"
    shutil.copyfile(dicom_dir / CHEST, path)
    watcher.scan()
    assert watcher.take_ready() == [path.resolve()]
    # events and scans while it is being processed do not offer it again
    watcher.notice(path.resolve())
    watcher.scan()
    assert watcher.take_ready() == []
    # kept in the inbox after processing: not offered again while unchanged...
    watcher.release(path.resolve())
    watcher.scan()
    assert watcher.take_ready() == []
    # ...but offered again once its content changes
    with open(path, "ab") as handle:
        handle.write(b"\0")
    watcher.scan()
    assert watcher.take_ready() == [path.resolve()]
    # retry_later: offered again without a change, once the delay has passed
    watcher.retry_later(path.resolve(), delay=5.0)
    assert watcher.take_ready() == []
    clock.now += 5.0
    assert watcher.take_ready() == [path.resolve()]


@pytest.mark.parametrize("polling", [False, True])
def test_files_dropped_while_stopped_are_found_by_the_start_up_scan(tmp_path, dicom_dir, polling):
    for i in range(3):
        shutil.copyfile(dicom_dir / CHEST, tmp_path / f"{i}.dcm")
    with InboxWatcher(tmp_path, settle_seconds=0.2, polling=polling) as watcher:
        watcher.scan()
        taken = _collect(watcher, 5.0, want=3)
    assert sorted(p.name for p in taken) == ["0.dcm", "1.dcm", "2.dcm"]


def test_without_inotify_the_watcher_falls_back_to_polling(tmp_path, dicom_dir, monkeypatch):
    import ingest.watcher as watcher_module

    class NoInotify:
        def __init__(self, *args, **kwargs):
            raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr(watcher_module, "Observer", NoInotify)
    with InboxWatcher(tmp_path, settle_seconds=0.2) as watcher:
        shutil.copyfile(dicom_dir / CHEST, tmp_path / "a.dcm")
        taken = _collect(watcher, 10.0)
    assert taken == [(tmp_path / "a.dcm").resolve()]
