"""Tests for ingest/cli.py and ingest/inspect.py: ``covid-cxr inspect FILE [--png OUT] [--json]``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from ingest.pixels import PREPROCESSING_VERSION
from ingest.reader import ReaderPolicy, read_radiograph
from service.cli import main

CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"
HIP = "pylibjpeg-data__RG2_JPLY_fixed.dcm"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_for_an_accepted_file_with_png(dicom_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "seen.png"
    code, out, _ = _run(capsys, str(dicom_dir / CHEST), "--json", "--png", str(png), "--data-dir", str(tmp_path))
    report = json.loads(out)

    assert code == 0
    assert report["accepted"] is True and report["reason"] is None and report["message"]
    assert report["preprocessing_version"] == PREPROCESSING_VERSION
    assert report["sha256"] == hashlib.sha256((dicom_dir / CHEST).read_bytes()).hexdigest()
    assert report["metadata"]["modality"] == "CR" and report["metadata"]["rows"] == 440
    assert "patient_id" not in report["metadata"]
    assert report["steps"][0] == "decode" and "invert_monochrome1" in report["steps"]
    assert report["png"] == str(png)
    written = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    policy = ReaderPolicy(frozenset({"CR", "DX"}), 60_000_000, "reject", b"any")
    np.testing.assert_array_equal(written, read_radiograph(dicom_dir / CHEST, policy).image)


def test_json_for_a_rejected_file_exits_zero(dicom_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "none.png"
    code, out, _ = _run(capsys, str(dicom_dir / HIP), "--json", "--png", str(png), "--data-dir", str(tmp_path))
    report = json.loads(out)
    assert code == 0
    assert report["accepted"] is False and report["reason"] == "wrong_body_part"
    assert "HIP" in report["message"]
    assert report["png"] is None and not png.exists()
    assert report["metadata"]["body_part_examined"] == "HIP"


def test_json_for_bytes_that_are_not_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    code, out, _ = _run(capsys, str(junk), "--json", "--data-dir", str(tmp_path))
    report = json.loads(out)
    assert code == 0 and report["reason"] == "not_dicom" and report["metadata"] is None


def test_human_readable_report(dicom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, str(dicom_dir / CHEST), "--data-dir", str(tmp_path))
    assert code == 0
    assert "ACCEPTED" in out and "Computed Radiography Image Storage" in out
    assert "decode > window > invert_monochrome1" in out and PREPROCESSING_VERSION in out

    code, out, _ = _run(capsys, str(dicom_dir / HIP), "--data-dir", str(tmp_path))
    assert code == 0
    assert "REJECTED wrong_body_part" in out and "not the chest" in out


def test_missing_path_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, str(tmp_path / "absent.dcm"), "--json", "--data-dir", str(tmp_path))
    assert code == 2 and out == "" and "absent.dcm: no such file [usage]" in err
    code, _, _ = _run(capsys, str(tmp_path), "--data-dir", str(tmp_path))  # a directory is not a file
    assert code == 2


def test_unwritable_png_is_an_error(dicom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, str(dicom_dir / CHEST), "--png", str(tmp_path / "no" / "dir" / "x.png"),
                        "--data-dir", str(tmp_path))
    assert code == 1 and "x.png" in err


def test_console_command_end_to_end(dicom_dir: Path, tmp_path: Path) -> None:
    """The installed entry point, as an operator runs it (stdout is exactly one JSON object)."""
    env = {**os.environ, "COVID_CXR_DATA_DIR": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, "-m", "covid_cxr", "inspect", str(dicom_dir / HIP), "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.load(io.StringIO(completed.stdout))
    assert report["accepted"] is False and report["reason"] == "wrong_body_part"


def test_inspect_never_writes_a_key_file(dicom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COVID_CXR_PSEUDONYM_KEY", raising=False)
    code, out, _ = _run(capsys, str(dicom_dir / CHEST), "--json")
    assert code == 0 and json.loads(out)["pseudonym_key"] == "ephemeral"
    assert list(tmp_path.iterdir()) == [], "inspect created files in the folder it ran in"


def test_inspect_uses_the_installation_key_where_there_is_one(dicom_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pseudonym.key").write_text("ab" * 32)
    code, out, _ = _run(capsys, str(dicom_dir / CHEST), "--json", "--data-dir", str(tmp_path))
    assert code == 0 and json.loads(out)["pseudonym_key"] == "key file"
