"""Disposal of inbox files: archive, keep, delete, quarantine; collision-safe names; nothing ever lost."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from pathlib import Path

import pytest

from covid_cxr.settings import load_settings
from ingest import inbox
from ingest.inbox import Disposal, carry_out, free_name, move_no_clobber, plan_disposal, read_reason, relative_name

CHEST = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path / "data")


def _drop(settings, dicom_dir: Path, rel: str, source: str = CHEST) -> Path:
    path = settings.inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dicom_dir / source, path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_archive_keeps_the_subfolder_and_never_overwrites(settings, dicom_dir):
    first = _drop(settings, dicom_dir, "site-a/IM0001.dcm")
    plan = plan_disposal(settings, first, relative_name(first, settings.inbox), accepted=True)
    assert plan == Disposal("archive", settings.archive.resolve() / "site-a" / "IM0001.dcm")
    assert carry_out(plan, first) == plan.destination
    assert not first.exists()

    second = _drop(settings, dicom_dir, "site-a/IM0001.dcm", "dwv__gdcm-CR-MONO1-10-chest.dcm")
    plan2 = plan_disposal(settings, second, "site-a/IM0001.dcm", accepted=True)
    assert plan2.destination.name == "IM0001~1.dcm"
    moved = carry_out(plan2, second)
    assert moved == plan2.destination
    # both files are there, each with its own content
    assert _sha(plan.destination) == _sha(dicom_dir / CHEST)
    assert _sha(moved) == _sha(dicom_dir / "dwv__gdcm-CR-MONO1-10-chest.dcm")


def test_uid_like_names_get_the_counter_at_the_end(tmp_path):
    taken = tmp_path / "1.2.840.10008.5"
    taken.write_bytes(b"x")
    assert free_name(taken).name == "1.2.840.10008.5~1"
    (tmp_path / "a.dcm").write_bytes(b"x")
    (tmp_path / "a~1.dcm").write_bytes(b"x")
    assert free_name(tmp_path / "a.dcm").name == "a~2.dcm"


def test_quarantine_writes_the_reason_beside_the_file(settings, dicom_dir):
    path = _drop(settings, dicom_dir, "hip.dcm", "pylibjpeg-data__RG2_JPLL.dcm")
    plan = plan_disposal(settings, path, "hip.dcm", accepted=False)
    assert plan.action == "quarantine"
    final = carry_out(plan, path, {"reason": "not_chest", "message": "BodyPartExamined is HIP"})
    assert final == settings.quarantine.resolve() / "hip.dcm"
    assert read_reason(final)["reason"] == "not_chest"
    assert (final.parent / "hip.dcm.reason.json").is_file()


def test_a_leftover_reason_marker_blocks_its_name(settings):
    settings.quarantine.mkdir(parents=True)
    (settings.quarantine / "x.dcm.reason.json").write_text("{}")
    assert free_name(settings.quarantine / "x.dcm").name == "x~1.dcm"


@pytest.mark.parametrize("mode", ["keep", "delete"])
def test_keep_leaves_the_file_and_delete_removes_it(tmp_path, dicom_dir, mode):
    settings = load_settings(data_dir=tmp_path, after_ingest=mode)
    path = _drop(settings, dicom_dir, "a.dcm")
    plan = plan_disposal(settings, path, "a.dcm", accepted=True)
    assert plan == Disposal(mode, path.resolve())
    result = carry_out(plan, path)
    if mode == "keep":
        assert result == path and path.exists()
    else:
        assert result is None and not path.exists()


def test_across_file_systems_the_file_is_copied_then_removed(settings, dicom_dir, monkeypatch):
    path = _drop(settings, dicom_dir, "a.dcm")
    expected = _sha(path)
    real_link = os.link

    def link(src, dst, **kwargs):
        if Path(src) == path:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(inbox.os, "link", link)
    (settings.archive).mkdir(parents=True)
    (settings.archive / "a.dcm").write_bytes(b"someone else's file")
    final = move_no_clobber(path, settings.archive / "a.dcm")
    assert final.name == "a~1.dcm" and _sha(final) == expected
    assert (settings.archive / "a.dcm").read_bytes() == b"someone else's file"
    assert not path.exists()
    assert [p.name for p in settings.archive.iterdir() if p.name.startswith(".")] == []


def test_without_hard_links_at_all_rename_still_never_overwrites(settings, dicom_dir, monkeypatch):
    path = _drop(settings, dicom_dir, "a.dcm")

    def no_link(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(inbox.os, "link", no_link)
    settings.archive.mkdir(parents=True)
    (settings.archive / "a.dcm").write_bytes(b"older")
    final = move_no_clobber(path, settings.archive / "a.dcm")
    assert final.name == "a~1.dcm" and (settings.archive / "a.dcm").read_bytes() == b"older"
    assert not path.exists()


def test_concurrent_moves_to_one_name_lose_nothing(tmp_path, dicom_dir):
    sources = []
    for i in range(16):
        path = tmp_path / "in" / str(i) / "same.dcm"
        path.parent.mkdir(parents=True)
        path.write_bytes((dicom_dir / CHEST).read_bytes() + str(i).encode())
        sources.append(path)
    expected = {_sha(s) for s in sources}
    destination = tmp_path / "archive" / "same.dcm"
    results: list[Path] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(sources))

    def move(source: Path) -> None:
        barrier.wait()
        final = move_no_clobber(source, destination)
        with lock:
            results.append(final)

    threads = [threading.Thread(target=move, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == len(sources)
    assert {_sha(p) for p in results} == expected
    assert not any(s.exists() for s in sources)
