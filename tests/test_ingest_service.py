"""The ingest loop without a worker: batching, disposal, restarts and crashes, with the publish step recorded."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
from fresh_copies import write_fresh_copies
from service_fixtures import RecordingPublisher as Publisher
from service_fixtures import RunningIngester, wait_until
from sqlalchemy import event, func, select, update

from covid_cxr.settings import load_settings
from db.migrate import upgrade
from db.models import Instance
from db.session import create_engine_for, session_scope
from ingest import service as service_module
from ingest.inbox import read_reason
from ingest.service import Batcher, IngestService

SIIM = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
SMALL_CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"
HIP = "pylibjpeg-data__RG2_JPLY_fixed.dcm"
MR = "dcmfx-pydicom__MR_small_RLE.dcm"
JPEG_LS_CHEST = "pylibjpeg-data__RG1_JLSN.dcm"
J2K_CHEST = "pylibjpeg-data__966_fixed.dcm"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batcher_sends_full_batches_at_once_and_partial_ones_after_the_wait():
    clock, sent = FakeClock(), []
    batcher = Batcher(3, 2.0, lambda ids: sent.append(ids) or True, clock=clock)
    for i in range(7):
        batcher.add(i)
    assert sent == [[0, 1, 2], [3, 4, 5]] and batcher.pending == 1
    batcher.flush()
    assert batcher.pending == 1 and batcher.seconds_until_due() == 2.0
    clock.now = 2.0
    batcher.flush()
    assert sent[-1] == [6] and batcher.pending == 0 and batcher.seconds_until_due() is None


def test_a_partial_batch_leaves_at_the_first_idle_check_while_the_workers_are_idle():
    clock, sent, idle_calls = FakeClock(), [], []

    def idle() -> bool:
        idle_calls.append(clock.now)
        return workers_idle

    workers_idle = False
    batcher = Batcher(3, 2.0, lambda ids: sent.append(ids) or True, clock=clock, idle=idle, idle_check_seconds=0.25)
    batcher.add(1)
    assert batcher.seconds_until_due() == 0.25, "the loop wakes for the idle check, not only after the wait"
    batcher.flush()
    assert idle_calls == [] and sent == [], "no check before idle_check_seconds: a burst gathers a little first"
    clock.now = 0.25
    batcher.flush()
    batcher.flush()
    assert idle_calls == [0.25] and sent == [], "busy workers: the batch keeps filling; asked once per interval"
    assert batcher.seconds_until_due() == 0.25
    workers_idle = True
    clock.now = 0.5
    batcher.add(2)
    batcher.flush()
    assert sent == [[1, 2]] and batcher.sent_early == 1 and batcher.pending == 0
    assert batcher.seconds_until_due() is None
    # A batch started later gets its own first check a quarter of a second after its first id.
    clock.now = 10.0
    batcher.add(3)
    batcher.flush()
    assert sent == [[1, 2]] and idle_calls == [0.25, 0.5]
    clock.now = 10.25
    batcher.flush()
    assert sent == [[1, 2], [3]]


def test_busy_workers_leave_the_partial_batch_to_its_wait_and_full_batches_never_wait():
    clock, sent = FakeClock(), []
    batcher = Batcher(2, 1.0, lambda ids: sent.append(ids) or True, clock=clock, idle=lambda: False)
    batcher.add(1)
    batcher.add(2)
    assert sent == [[1, 2]], "a full batch leaves at once, idle or not"
    batcher.add(3)
    for step in range(1, 4):
        clock.now = step * 0.25
        batcher.flush()
    assert sent == [[1, 2]]
    clock.now = 1.0
    batcher.flush()
    assert sent == [[1, 2], [3]] and batcher.sent_early == 0


def test_a_refused_batch_is_left_to_reconciliation():
    batcher = Batcher(2, 1.0, lambda ids: False, clock=FakeClock())
    batcher.add(1)
    batcher.add(2)
    assert batcher.pending == 0 and batcher.refused_batches == 1 and batcher.sent_batches == 0


@pytest.fixture
def settings(tmp_path):
    # The recording publisher marks nothing 'queued', so the workers always look idle: these tests pin the
    # batches' composition, so partial batches wait their batch_max_wait_seconds (idle batching has its own tests).
    settings = load_settings(data_dir=tmp_path / "data", settle_seconds=0.3, batch_size=2, batch_max_wait_seconds=0.3,
                             reconcile_interval_seconds=1.0, batch_when_idle=False)
    upgrade(settings)
    return settings


def _drop(settings, source: Path, rel: str) -> Path:
    """Copy in under a temporary name, then rename: how a careful sender delivers."""
    target = settings.inbox / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".part")
    shutil.copyfile(source, staging)
    staging.rename(target)
    return target


def _rows(settings) -> list[Instance]:
    with session_scope(settings) as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)).all())


def running(service: IngestService) -> RunningIngester:
    """The service in a thread, stopped on exit."""
    return RunningIngester(service.settings, service)


def _wait_for_rows(settings, count: int, timeout: float = 60.0) -> list[Instance]:
    return wait_until(lambda: (rows := _rows(settings)) and len(rows) >= count and rows, timeout=timeout,
                      what=f"{count} instance rows")


def test_files_are_recorded_batched_and_disposed_of(settings, dicom_dir):
    publisher = Publisher()
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue, progress_interval=0.2)
    with running(service):
        for rel, name in [("s1/a.dcm", SIIM), ("s1/b.dcm", SMALL_CHEST), ("hip.dcm", HIP), ("mr", MR)]:
            _drop(settings, dicom_dir / name, rel)
        _wait_for_rows(settings, 4)
        _drop(settings, dicom_dir / SIIM, "s1/a-again.dcm")
        rows = _wait_for_rows(settings, 5)
        wait_until(lambda: sum(len(b) for b in publisher.batches) == 2, timeout=10, what="one batch of two")
    by_name = {row.file_name: row for row in rows}
    assert {name: row.state for name, row in by_name.items()} == {
        "s1/a.dcm": "received", "s1/b.dcm": "received", "hip.dcm": "rejected", "mr": "rejected",
        "s1/a-again.dcm": "duplicate"}
    assert publisher.batches == [sorted([by_name["s1/a.dcm"].id, by_name["s1/b.dcm"].id])]
    assert publisher.requeues >= 1
    archive, quarantine = settings.archive.resolve(), settings.quarantine.resolve()
    assert sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file()) == [
        "s1/a-again.dcm", "s1/a.dcm", "s1/b.dcm"]
    assert read_reason(quarantine / "hip.dcm")["reason"] == "wrong_body_part"
    assert read_reason(quarantine / "mr")["reason"] == "wrong_modality"
    assert [p for p in settings.inbox.rglob("*") if p.is_file()] == []
    for row in rows:
        assert Path(row.stored_path).is_file()
    assert service.counts["received"] == 2


def test_files_decoded_together_are_recorded_in_one_transaction(settings, dicom_dir, tmp_path):
    """A burst is written in groups (one commit for several files), and still one row per file."""
    from fresh_copies import write_fresh_copies

    staged = write_fresh_copies([dicom_dir / SMALL_CHEST, dicom_dir / SIIM], 12, tmp_path / "staging",
                                "f{:02d}.dcm".format)
    inserts_per_commit, inserts = [], [0]

    def statement(_connection, _cursor, sql: str, *_args) -> None:
        inserts[0] += sql.lstrip().upper().startswith("INSERT INTO INSTANCES")

    def commit(_connection) -> None:
        inserts_per_commit.append(inserts[0])
        inserts[0] = 0

    engine = create_engine_for(settings)
    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    publisher = Publisher()
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    try:
        with running(service):
            for path in staged:
                path.rename(settings.inbox / path.name)
            rows = _wait_for_rows(settings, 12)
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)
    assert sorted(row.file_name for row in rows) == sorted(path.name for path in staged)
    assert all(row.state == "received" for row in rows)
    assert sum(inserts_per_commit) == 12 and max(inserts_per_commit) >= 2, inserts_per_commit


def test_a_file_written_to_after_it_was_read_is_left_out_of_its_group(settings, dicom_dir):
    """The group's other files are recorded; the changed one gets FileChanged (judged again later) and no row."""
    from ingest.inbox import FileChanged
    from ingest.reader import ReaderPolicy, read_radiograph
    from ingest.service import _Decoded

    publisher = Publisher()
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    try:
        group = []
        for rel, name in (("kept.dcm", SIIM), ("changed.dcm", SMALL_CHEST)):
            claim = service.claims.claim(_drop(settings, dicom_dir / name, rel))
            item = service._begin(claim, None, submit=False)
            data = claim.path.read_bytes()  # as its decode process reads it
            group.append(_Decoded(item, read_radiograph(data, ReaderPolicy.from_settings(settings)), 0.0, 0.0))
        with group[1].item.claim.path.open("ab") as handle:  # a writer still holding the file appends
            handle.write(b"more")
        kept, changed = service._record_and_dispose_group(group)
    finally:
        service.close()
    assert isinstance(changed, FileChanged)
    assert not isinstance(kept, Exception) and kept.state == "received"
    assert [row.file_name for row in _rows(settings)] == ["kept.dcm"]


@pytest.mark.parametrize("after_ingest", ["archive", "keep"])
def test_the_loop_reads_and_hashes_a_file_only_when_it_is_kept(tmp_path, dicom_dir, monkeypatch, after_ingest):
    """The decode process reads and hashes a claimed file itself, so the loop all decode processes share does
    neither; a kept file (met again at every start) is hashed here once, to ask before decoding whether it is
    recorded already."""
    settings = load_settings(data_dir=tmp_path / "data", after_ingest=after_ingest, batch_when_idle=False)
    upgrade(settings)
    data = (dicom_dir / SIIM).read_bytes()
    sha256, hashed, read = hashlib.sha256, [], []

    def counting_sha256(*args, **kwargs):
        if args and args[0] == data:
            hashed.append(data)
        return sha256(*args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    reading = service_module.read_inbox_file
    monkeypatch.setattr(service_module, "read_inbox_file", lambda path: read.append(path) or reading(path))
    publisher = Publisher()
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    try:
        outcome = service.process_file(_drop(settings, dicom_dir / SIIM, "a.dcm"))
    finally:
        service.close()
    assert outcome is not None and outcome.enqueue
    assert (len(read), len(hashed)) == ((1, 1) if after_ingest == "keep" else (0, 0))
    [row] = _rows(settings)
    assert row.file_sha256 == sha256(data).hexdigest()


def test_a_file_whose_decode_process_overran_is_read_here_for_its_row_and_its_quarantine_copy(tmp_path, dicom_dir):
    """The decode process reads a claimed file itself; when it is killed for overrunning, the loop reads the file,
    so that the row has its sha256 and the quarantine copy is written from the bytes (a new inode)."""
    settings = load_settings(data_dir=tmp_path / "data", decode_timeout_seconds=0.01, batch_when_idle=False)
    upgrade(settings)
    data = (dicom_dir / JPEG_LS_CHEST).read_bytes()  # about 80 ms to decode: far over 10 ms
    path = _drop(settings, dicom_dir / JPEG_LS_CHEST, "slow.dcm")
    dropped_inode = path.stat().st_ino
    publisher = Publisher()
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    try:
        outcome = service.process_file(path)
    finally:
        service.close()
    assert outcome is not None and outcome.reason == "decode_timeout"
    [row] = _rows(settings)
    assert row.file_sha256 == hashlib.sha256(data).hexdigest()
    quarantined = Path(row.stored_path)
    assert quarantined.read_bytes() == data and quarantined.stat().st_ino != dropped_inode
    assert read_reason(quarantined)["sha256"] == row.file_sha256


def test_kept_files_are_not_processed_again_after_a_restart(tmp_path, dicom_dir):
    settings = load_settings(data_dir=tmp_path, after_ingest="keep", settle_seconds=0.2, batch_max_wait_seconds=0.1)
    upgrade(settings)
    publisher = Publisher()
    _drop(settings, dicom_dir / SIIM, "a.dcm")
    with running(IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)):
        _wait_for_rows(settings, 1)
    assert (settings.inbox / "a.dcm").exists()
    restarted = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    _drop(settings, dicom_dir / SMALL_CHEST, "b.dcm")
    with running(restarted):
        _wait_for_rows(settings, 2)
        wait_until(lambda: restarted.counts["already_recorded"] == 1, timeout=10, what="a.dcm recognised")
    assert [row.file_name for row in _rows(settings)] == ["a.dcm", "b.dcm"]


def test_a_crash_between_commit_and_move_is_finished_by_the_next_run(settings, dicom_dir, monkeypatch):
    publisher = Publisher()
    path = _drop(settings, dicom_dir / HIP, "hip.dcm")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(service_module, "carry_out", crash)
    with pytest.raises(KeyboardInterrupt):
        IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue).process_file(path)
    monkeypatch.undo()
    [row] = _rows(settings)
    assert path.exists() and row.stored_path == str(settings.quarantine.resolve() / "hip.dcm")

    assert IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue).process_file(path) is None
    [again] = _rows(settings)
    assert again.id == row.id and not path.exists()
    assert read_reason(Path(row.stored_path))["reason"] == "wrong_body_part"


def _crash_after_commit(settings, paths: list[Path], monkeypatch) -> None:
    """Record each file and crash before it is moved: its row is committed, the file is back in the inbox."""
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    publisher = Publisher()
    monkeypatch.setattr(service_module, "carry_out", crash)
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    try:
        for path in paths:
            with pytest.raises(KeyboardInterrupt):
                service.process_file(path)
    finally:
        service.close()
        monkeypatch.undo()
    assert all(path.exists() for path in paths) and len(_rows(settings)) == len(paths)


def test_the_loop_recognises_files_recorded_before_a_crash_in_its_recorder_threads(settings, dicom_dir, monkeypatch):
    """The loop never asks "recorded before?" file by file: a recorder thread recognises the files in the transaction
    that would record them, finishes the disposal a crash left undone, and an accepted file that never reached a
    batch is sent now."""
    crashed = [_drop(settings, dicom_dir / name, f"{index}.dcm") for index, name in enumerate([SIIM, SMALL_CHEST, HIP])]
    _crash_after_commit(settings, crashed, monkeypatch)
    before = {row.file_name: row for row in _rows(settings)}
    assert [before[name].state for name in ("0.dcm", "1.dcm", "2.dcm")] == ["received", "received", "rejected"]

    def per_file(*args, **kwargs):
        raise AssertionError("the loop asked for one file")

    monkeypatch.setattr(service_module, "find_recorded_file", per_file)
    publisher = Publisher()
    _drop(settings, dicom_dir / J2K_CHEST, "new.dcm")
    with running(IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)) as service:
        wait_until(lambda: service.counts["already_recorded"] == 3 and len(_rows(settings)) == 4
                   and sum(map(len, publisher.batches)) == 3, timeout=30, what="3 recognised, 1 new, 3 sent")
    rows = {row.file_name: row for row in _rows(settings)}
    assert all(rows[name].id == before[name].id for name in before), "recognised, not recorded again"
    assert sorted(id_ for batch in publisher.batches for id_ in batch) == sorted(
        [before["0.dcm"].id, before["1.dcm"].id, rows["new.dcm"].id])
    assert not any(settings.inbox.rglob("*.dcm"))
    for name in ("0.dcm", "1.dcm", "new.dcm"):
        assert Path(rows[name].stored_path).read_bytes()[128:132] == b"DICM"
    assert read_reason(Path(before["2.dcm"].stored_path))["reason"] == "wrong_body_part"


def test_a_too_large_file_recorded_before_a_crash_is_not_recorded_again(tmp_path, dicom_dir, monkeypatch):
    settings = load_settings(data_dir=tmp_path / "data", max_file_bytes=1024, batch_when_idle=False)
    upgrade(settings)
    path = _drop(settings, dicom_dir / SIIM, "big.dcm")
    _crash_after_commit(settings, [path], monkeypatch)
    [row] = _rows(settings)
    assert row.reason == "too_large"
    publisher = Publisher()
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    try:
        assert service.process_file(path) is None
    finally:
        service.close()
    [again] = _rows(settings)
    assert again.id == row.id and not path.exists() and Path(row.stored_path).exists()


def test_with_the_broker_down_instances_stay_received_for_reconciliation(settings, dicom_dir):
    publisher = Publisher()
    publisher.down = True
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    for i, name in enumerate([SIIM, SMALL_CHEST]):
        service.process_file(_drop(settings, dicom_dir / name, f"{i}.dcm"))
    assert service.batcher.refused_batches == 1 and service.batcher.pending == 0
    assert [row.state for row in _rows(settings)] == ["received", "received"]
    service.reconcile()
    assert publisher.requeues == 1


def test_delete_mode_removes_accepted_files_and_still_quarantines_rejects(tmp_path, dicom_dir):
    settings = load_settings(data_dir=tmp_path, after_ingest="delete")
    upgrade(settings)
    publisher = Publisher()
    service = IngestService(settings, enqueue=publisher.enqueue, requeue=publisher.requeue)
    service.process_file(_drop(settings, dicom_dir / SIIM, "a.dcm"))
    service.process_file(_drop(settings, dicom_dir / HIP, "hip.dcm"))
    accepted, rejected = _rows(settings)
    assert accepted.stored_path is None and not (settings.inbox / "a.dcm").exists()
    assert Path(rejected.stored_path).is_file()
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 2


def test_a_partial_batch_leaves_early_only_when_nothing_more_comes_and_no_batch_is_queued(tmp_path, dicom_dir):
    """The real publisher (the embedded folder broker, no worker), batches of 32 or 120 s: a burst of three leaves
    as one batch once the last is recorded; a lone file waits while that batch is 'queued', and leaves as soon as
    a worker has finished it."""
    settings = load_settings(data_dir=tmp_path, settle_seconds=0.2, batch_max_wait_seconds=120.0,
                             reconcile_interval_seconds=300.0, decode_processes=1)
    upgrade(settings)
    states = lambda: {row.file_name: row.state for row in _rows(settings)}  # noqa: E731
    burst = {f"burst/{i}.dcm": "queued" for i in range(10)}
    with RunningIngester(settings) as service:
        # One decode process and slower syntaxes (JPEG-LS, JPEG 2000): the burst takes longer to decode than
        # a partial batch's first idle check, so an early send that ignored the files in hand would split it.
        sources = [dicom_dir / JPEG_LS_CHEST, dicom_dir / J2K_CHEST]
        staged = write_fresh_copies(sources, len(burst), tmp_path / "staged", "{}.dcm".format)
        (settings.inbox / "burst").mkdir(parents=True)
        for path in staged:
            path.rename(settings.inbox / "burst" / path.name)
        wait_until(lambda: states() == burst, timeout=30, what="the burst sent early")
        with session_scope(settings) as session:
            assert len(set(session.scalars(select(Instance.batch_id)))) == 1, "a burst leaves as one batch"
        _drop(settings, dicom_dir / SMALL_CHEST, "lone.dcm")
        wait_until(lambda: states().get("lone.dcm") == "received", timeout=20, what="the lone file recorded")
        time.sleep(1.0)  # four idle checks
        assert states() == {**burst, "lone.dcm": "received"}, "a worker is busy: the batch keeps filling"
        assert service.batcher.pending == 1
        with session_scope(settings) as session:  # what a worker's commit does at the end of its batch
            session.execute(update(Instance).where(Instance.file_name.in_(burst)).values(state="predicted"))
        wait_until(lambda: states()["lone.dcm"] == "queued", timeout=5, what="the lone file's batch sent early")
    assert service.batcher.sent_early == 2 and service.batcher.sent_batches == 2


def test_the_docs_document_every_setting():
    """docs/configure.md generates its settings table; every variable it names by hand must be a setting too."""
    import re

    from covid_cxr.settings import ENV_PREFIX, Settings

    page = (Path(__file__).resolve().parents[1] / "docs" / "configure.md").read_text()
    assert "<!-- generated: settings-table -->" in page.split("\n## Settings reference\n", 1)[1]
    named = set(re.findall(rf"`{ENV_PREFIX}([A-Z_]+)`", page))
    assert {name.lower() for name in named} <= set(Settings.model_fields)


# --- the commands ------------------------------------------------------------------------------------


def test_serve_without_an_active_model_refuses_and_says_how_to_get_one(tmp_path, capsys):
    from service.cli import main

    assert main(["serve", "--data-dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "[no_active_model]" in error
    assert "covid-cxr train" in error and "covid-cxr models import" in error
    assert (tmp_path / "covid-cxr.sqlite3").exists()  # the embedded database is created on first start


def test_an_out_of_date_embedded_database_is_refused(tmp_path, capsys):
    from service.cli import main

    upgrade(load_settings(data_dir=tmp_path), "0001")
    assert main(["serve", "--data-dir", str(tmp_path)]) == 1
    assert "covid-cxr db upgrade" in capsys.readouterr().err


def test_a_server_database_is_never_migrated_by_serve(tmp_path, postgres_url, capsys):
    from service.cli import main

    assert main(["ingest", "--data-dir", str(tmp_path), "--database-url", postgres_url]) == 1
    assert "[schema_out_of_date]" in capsys.readouterr().err


def test_an_inbox_that_is_the_data_dir_is_refused(tmp_path, capsys):
    from service.cli import main

    assert main(["ingest", "--data-dir", str(tmp_path), "--inbox", str(tmp_path)]) == 1
    assert "[bad_configuration]" in capsys.readouterr().err


def test_ingest_stops_cleanly_on_sigterm(tmp_path, dicom_dir):
    import signal
    import subprocess
    import sys

    log_path = tmp_path / "ingest.log"
    env = {**os.environ, "COVID_CXR_SETTLE_SECONDS": "0.2"}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "covid_cxr", "ingest", "--data-dir", str(tmp_path / "data")],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: "watching" in log_path.read_text(), timeout=60, what="the ingester to start")
        settings = load_settings(data_dir=tmp_path / "data")
        _drop(settings, dicom_dir / HIP, "hip.dcm")
        _wait_for_rows(settings, 1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "SIGTERM received" in log_path.read_text()
