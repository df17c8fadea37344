"""Recording read files: rows, normalized images, duplicates, conflicts, and recognising a file already recorded."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from service_fixtures import changed_pixel_copy
from sqlalchemy import event, func, select, update

from covid_cxr.reasons import Reason
from covid_cxr.settings import load_settings
from db.migrate import upgrade
from db.models import Instance, InstanceState, NormalizedImage, Study
from db.session import create_engine_for, session_scope
from ingest.inbox import carry_out, relative_name
from ingest.pixels import PREPROCESSING_VERSION
from ingest.reader import ReaderPolicy, read_radiograph
from ingest.recorder import (
    FileToRecord,
    Outcome,
    RecordedBefore,
    any_queued,
    find_recorded_file,
    record,
    record_group,
    set_stored_path,
)

SIIM = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
UNCOMPRESSED_CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"
HIP = "pylibjpeg-data__RG2_JPLY_fixed.dcm"


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    settings = load_settings(data_dir=tmp_path / "data", database_url=url)
    upgrade(settings)
    return settings


def _drop(settings, source: Path, rel: str) -> Path:
    path = settings.inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return path


def _record(settings, path: Path):
    data = path.read_bytes()
    result = read_radiograph(data, ReaderPolicy.from_settings(settings))
    return record(settings, path=path, rel_name=relative_name(path, settings.inbox), file_size=len(data),
                  result=result), result


def _instance(settings, instance_id: int) -> Instance:
    with session_scope(settings) as session:
        return session.get(Instance, instance_id)


def test_an_accepted_file_records_study_instance_and_normalized_image(settings, dicom_dir):
    path = _drop(settings, dicom_dir / SIIM, "site/chest.dcm")
    outcome, result = _record(settings, path)
    assert outcome.state is InstanceState.received and outcome.enqueue
    assert outcome.disposal.action == "archive"
    assert outcome.disposal.destination == settings.archive.resolve() / "site" / "chest.dcm"
    with session_scope(settings) as session:
        instance = session.get(Instance, outcome.instance_id)
        assert instance.state == "received" and instance.reason is None and instance.finished_at is None
        assert instance.file_name == "site/chest.dcm" and instance.file_sha256 == result.sha256
        assert instance.file_size == path.stat().st_size
        assert instance.stored_path == str(outcome.disposal.destination)
        assert instance.sop_instance_uid == result.metadata.sop_instance_uid
        assert instance.modality == "CR" and instance.body_part_examined == "CHEST"
        study = session.get(Study, instance.study_id)
        assert study.study_instance_uid == result.metadata.study_instance_uid
        image = session.get(NormalizedImage, instance.id)
        assert image.preprocessing_version == PREPROCESSING_VERSION
        decoded = cv2.imdecode(np.frombuffer(image.png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (224, 224) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, result.image)  # PNG is lossless: the worker sees exactly this
    assert image.mean == pytest.approx(result.image.mean()) and image.std == pytest.approx(result.image.std())
    assert len(image.png) < 100_000


def test_a_rejected_file_is_recorded_with_its_reason_and_goes_to_quarantine(settings, dicom_dir):
    outcome, _ = _record(settings, _drop(settings, dicom_dir / HIP, "hip.dcm"))
    assert outcome.state is InstanceState.rejected and not outcome.enqueue
    assert outcome.reason == "wrong_body_part" and outcome.disposal.action == "quarantine"
    instance = _instance(settings, outcome.instance_id)
    assert instance.reason == "wrong_body_part" and instance.message and instance.finished_at is not None
    assert instance.study_id is None and instance.sop_instance_uid  # UIDs kept for duplicate detection
    with session_scope(settings) as session:
        assert session.get(NormalizedImage, outcome.instance_id) is None


def test_any_queued_says_whether_a_sent_batch_is_unfinished(settings, dicom_dir):
    """The ingester's "are the workers idle?" probe (``COVID_CXR_BATCH_WHEN_IDLE``), on both databases."""
    outcome, _ = _record(settings, _drop(settings, dicom_dir / SIIM, "a.dcm"))
    _record(settings, _drop(settings, dicom_dir / HIP, "hip.dcm"))  # a rejected row is never queued
    assert not any_queued(settings), "received, not sent yet"
    for state, queued in (("queued", True), ("predicted", False)):
        with session_scope(settings) as session:
            session.execute(update(Instance).where(Instance.id == outcome.instance_id).values(state=state))
        assert any_queued(settings) is queued, state


def test_a_file_that_is_not_dicom_is_rejected(settings):
    path = settings.inbox / "notes.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"Patient called, will send the films tomorrow.\n")
    outcome, _ = _record(settings, path)
    assert outcome.state is InstanceState.rejected and outcome.reason == "not_dicom"
    assert _instance(settings, outcome.instance_id).sop_instance_uid is None


def test_the_same_instance_again_is_a_duplicate(settings, dicom_dir):
    first, _ = _record(settings, _drop(settings, dicom_dir / SIIM, "a.dcm"))
    again, _ = _record(settings, _drop(settings, dicom_dir / SIIM, "copy-of-a.dcm"))
    assert again.state is InstanceState.duplicate and not again.enqueue
    assert again.duplicate_of_id == first.instance_id and not again.conflict
    assert again.reason is Reason.DUPLICATE_INSTANCE and again.disposal.action == "archive"
    with session_scope(settings) as session:
        assert session.get(NormalizedImage, again.instance_id) is None
        assert session.scalar(select(func.count()).select_from(Study)) == 1


def test_a_rejected_instance_again_is_a_duplicate_too(settings, dicom_dir):
    first, _ = _record(settings, _drop(settings, dicom_dir / HIP, "hip.dcm"))
    again, _ = _record(settings, _drop(settings, dicom_dir / HIP, "hip-again.dcm"))
    assert again.state is InstanceState.duplicate and again.duplicate_of_id == first.instance_id
    assert again.disposal.action == "quarantine"


def test_changed_content_under_the_same_sop_instance_uid_is_a_conflict(settings, dicom_dir):
    first, _ = _record(settings, _drop(settings, dicom_dir / UNCOMPRESSED_CHEST, "chest.dcm"))
    changed = settings.inbox / "chest-edited.dcm"
    changed_pixel_copy(dicom_dir / UNCOMPRESSED_CHEST, changed)
    conflict, result = _record(settings, changed)
    assert result.accepted  # a perfectly readable file...
    assert conflict.state is InstanceState.rejected and conflict.reason is Reason.SOP_INSTANCE_CONFLICT  # ...held back
    assert conflict.conflict and conflict.duplicate_of_id == first.instance_id
    assert conflict.disposal.action == "quarantine"
    assert _instance(settings, first.instance_id).state == "received"  # the first version is untouched
    # a third copy identical to the conflicting one is a duplicate of it, not a new conflict
    again, _ = _record(settings, _drop(settings, changed, "chest-edited-again.dcm"))
    assert again.state is InstanceState.duplicate and again.duplicate_of_id == first.instance_id


def test_concurrent_ingesters_leave_one_primary_row(settings, dicom_dir):
    paths = [_drop(settings, dicom_dir / SIIM, f"{i}.dcm") for i in range(4)]
    barrier = threading.Barrier(len(paths))
    outcomes = []
    lock = threading.Lock()

    def ingest(path: Path) -> None:
        barrier.wait()
        outcome, _ = _record(settings, path)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=ingest, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    states = sorted(o.state for o in outcomes)
    assert states == ["duplicate", "duplicate", "duplicate", "received"]


def test_a_kept_file_is_recognised_on_the_next_scan(tmp_path, dicom_dir):
    settings = load_settings(data_dir=tmp_path, after_ingest="keep")
    upgrade(settings)
    path = _drop(settings, dicom_dir / SIIM, "a.dcm")
    outcome, result = _record(settings, path)
    assert carry_out(outcome.disposal, path) == path
    found = find_recorded_file(settings, path, "a.dcm", result.sha256)
    assert found is not None and found.id == outcome.instance_id


def test_a_crash_between_commit_and_move_is_recognised(settings, dicom_dir):
    path = _drop(settings, dicom_dir / SIIM, "a.dcm")
    outcome, result = _record(settings, path)
    # the process died here: the row says archive/a.dcm, the file is still in the inbox
    found = find_recorded_file(settings, path, "a.dcm", result.sha256)
    assert found is not None and found.id == outcome.instance_id


def test_a_crash_between_link_and_unlink_is_recognised(settings, dicom_dir):
    path = _drop(settings, dicom_dir / SIIM, "a.dcm")
    outcome, result = _record(settings, path)
    outcome.disposal.destination.parent.mkdir(parents=True)
    os.link(path, outcome.disposal.destination)  # the move's first half
    assert find_recorded_file(settings, path, "a.dcm", result.sha256).id == outcome.instance_id


def test_the_same_file_dropped_again_after_archiving_is_new(settings, dicom_dir):
    path = _drop(settings, dicom_dir / SIIM, "a.dcm")
    outcome, result = _record(settings, path)
    carry_out(outcome.disposal, path)
    again = _drop(settings, dicom_dir / SIIM, "a.dcm")
    assert find_recorded_file(settings, again, "a.dcm", result.sha256) is None
    assert _record(settings, again)[0].state is InstanceState.duplicate


def test_a_deleted_file_dropped_again_is_new(tmp_path, dicom_dir):
    settings = load_settings(data_dir=tmp_path, after_ingest="delete")
    upgrade(settings)
    path = _drop(settings, dicom_dir / SIIM, "a.dcm")
    outcome, result = _record(settings, path)
    assert carry_out(outcome.disposal, path) is None
    set_stored_path(settings, outcome.instance_id, None)
    again = _drop(settings, dicom_dir / SIIM, "a.dcm")
    assert find_recorded_file(settings, again, "a.dcm", result.sha256) is None


def _to_record(settings, path: Path) -> FileToRecord:
    data = path.read_bytes()
    return FileToRecord(path, relative_name(path, settings.inbox), len(data),
                        read_radiograph(data, ReaderPolicy.from_settings(settings)))


def _count_commits(settings) -> list[int]:
    commits = [0]

    def counted(_connection) -> None:
        commits[0] += 1

    event.listen(create_engine_for(settings), "commit", counted)
    return commits


def test_a_group_is_recorded_in_one_commit_with_the_rules_of_one_by_one(settings, dicom_dir):
    """Files of one group see each other: the same instance twice is a duplicate, changed content a conflict."""
    chest = _drop(settings, dicom_dir / UNCOMPRESSED_CHEST, "chest.dcm")
    edited = settings.inbox / "chest-edited.dcm"
    changed_pixel_copy(dicom_dir / UNCOMPRESSED_CHEST, edited)
    files = [_to_record(settings, path) for path in (
        chest, _drop(settings, dicom_dir / SIIM, "siim.dcm"), _drop(settings, dicom_dir / SIIM, "siim-again.dcm"),
        edited, _drop(settings, dicom_dir / HIP, "hip.dcm"))]
    commits = _count_commits(settings)
    outcomes = record_group(settings, files)
    assert commits[0] == 1
    assert all(not isinstance(outcome, Exception) for outcome in outcomes)
    chest_row, siim, siim_again, conflict, hip = outcomes
    assert [o.state for o in outcomes] == ["received", "received", "duplicate", "rejected", "rejected"]
    assert siim_again.duplicate_of_id == siim.instance_id
    assert conflict.conflict and conflict.reason is Reason.SOP_INSTANCE_CONFLICT
    assert conflict.duplicate_of_id == chest_row.instance_id
    assert hip.reason is files[4].result.reason and hip.disposal.action == "quarantine"
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 5
        stored = session.get(NormalizedImage, siim.instance_id)
        assert stored is not None and session.get(NormalizedImage, siim_again.instance_id) is None
    image = cv2.imdecode(np.frombuffer(stored.png, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(image, files[1].result.image)


def test_a_group_recognises_a_file_recorded_before_and_asks_nothing_of_new_drops(settings, dicom_dir):
    """``recognise_at``: a restart's own file is answered with its row, not recorded again; a new drop (content no
    row has) costs no recognition query; a copy of recorded content under another name is still a duplicate."""
    crashed = _drop(settings, dicom_dir / SIIM, "a.dcm")
    first, _ = _record(settings, crashed)  # and the process died before the move
    statements: list[str] = []
    event.listen(create_engine_for(settings), "before_cursor_execute",
                 lambda _conn, _cursor, statement, *rest: statements.append(statement))
    new = _drop(settings, dicom_dir / UNCOMPRESSED_CHEST, "b.dcm")
    copy = _drop(settings, dicom_dir / SIIM, "copy-of-a.dcm")
    files = [dataclasses.replace(_to_record(settings, path), recognise_at=path) for path in (crashed, new, copy)]
    statements.clear()
    again, recorded, duplicate = record_group(settings, files)
    assert isinstance(again, RecordedBefore) and again.instance.id == first.instance_id
    assert isinstance(recorded, Outcome) and recorded.state is InstanceState.received
    assert isinstance(duplicate, Outcome) and duplicate.state is InstanceState.duplicate
    asked = [statement for statement in statements if "file_name =" in statement]
    assert len(asked) == 2, "asked for the recorded content only (a.dcm and its copy), not for the new drop"
    with session_scope(settings) as session:
        assert sorted(session.scalars(select(Instance.file_name))) == ["a.dcm", "b.dcm", "copy-of-a.dcm"]


def test_a_file_whose_rows_cannot_be_written_fails_alone(settings, dicom_dir):
    """The group is rolled back and its files recorded one by one: only the broken one gets an error."""
    good = [_to_record(settings, _drop(settings, dicom_dir / name, name)) for name in (SIIM, UNCOMPRESSED_CHEST)]
    broken = good[0].result.metadata
    assert broken is not None
    unwritable = dataclasses.replace(broken, modality=object(), sop_instance_uid="1.2.826.0.1.3680043.2.1143.7")
    bad = dataclasses.replace(good[0], rel_name="bad.dcm", result=dataclasses.replace(good[0].result,
                                                                                     metadata=unwritable))
    outcomes = record_group(settings, [good[0], bad, good[1]])
    assert isinstance(outcomes[1], Exception)
    assert [o.state for o in (outcomes[0], outcomes[2])] == ["received", "received"]
    with session_scope(settings) as session:
        names = sorted(session.scalars(select(Instance.file_name)))
    assert names == sorted([SIIM, UNCOMPRESSED_CHEST])
