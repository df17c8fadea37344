"""End to end: ``covid-cxr serve`` corrects an inverted and a turned chest film, and ``results`` and ``status`` show it.

Three real chest images wrapped as DX files (upright, stored as a negative, turned 90 degrees
clockwise) go through a real ``serve`` with the real (untrained) Keras model. The two damaged
ones are predicted from the corrected image, flagged, and their checks recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_wrap import wrap_as_dicom
from service_fixtures import embedded_settings
from sqlalchemy import select
from test_service_e2e import FAST, Serve, wait_all_terminal

from db.models import NormalizedImage, QualityCheckRecord
from db.session import session_scope
from ingest.pixels import load_image_file, normalize_grayscale
from service.cli import main

pytestmark = pytest.mark.slow

WIDE_CHEST = "covid/actualmed__CR.1.2.840.113564.1722810170.20200320011259312440.1003000225002.jpg"


def _drop(pixels: np.ndarray, work: Path, inbox: Path, name: str) -> None:
    png = work / f"{name}.png"
    cv2.imwrite(str(png), pixels)
    wrap_as_dicom(png, work / f"{name}.dcm")
    (work / f"{name}.dcm").rename(inbox / f"{name}.dcm")  # complete files appear at once


def test_serve_corrects_an_inverted_and_a_turned_film(tmp_path: Path, cxr_dir: Path, active_model,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    settings = embedded_settings(tmp_path / "data", inbox_dir=tmp_path / "inbox", **FAST)
    model = active_model.register(settings)
    settings.inbox.mkdir(parents=True, exist_ok=True)
    work = tmp_path / "work"
    work.mkdir()
    film = load_image_file(cxr_dir / WIDE_CHEST)
    expected_input = normalize_grayscale(film)

    serve = Serve(settings, tmp_path / "serve.log")
    try:
        _drop(film, work, settings.inbox, "upright")
        _drop(255 - film, work, settings.inbox, "negative")
        _drop(np.ascontiguousarray(np.rot90(film, -1)), work, settings.inbox, "turned")
        rows = wait_all_terminal(settings, {"upright.dcm", "negative.dcm", "turned.dcm"})
        assert serve.interrupt() == 0
    finally:
        serve.kill()

    assert {name: row.state for name, row in rows.items()} == dict.fromkeys(rows, "predicted")
    assert rows["upright.dcm"].flags is None
    assert rows["negative.dcm"].flags == ["qc_polarity_corrected"]
    assert rows["turned.dcm"].flags == ["qc_orientation_corrected"]
    with session_scope(settings) as session:
        checks = {(row.instance_id, row.check_name): row for row in session.scalars(select(QualityCheckRecord))}
        images = {row.instance_id: row.png for row in session.scalars(select(NormalizedImage))}
    turned_check = checks[(rows["turned.dcm"].id, "orientation")]
    assert (turned_check.decision, turned_check.finding, turned_check.action) == (
        "correct", "rotated_90_cw", "rotated 90° counter-clockwise")
    assert checks[(rows["negative.dcm"].id, "polarity")].action == "inverted"
    assert len(checks) == 9 and {row.version for row in checks.values()} == {"cxr-qc-1"}
    for name in ("upright.dcm", "negative.dcm", "turned.dcm"):  # the model saw the upright, bones-bright film
        stored = cv2.imdecode(np.frombuffer(images[rows[name].id], np.uint8), cv2.IMREAD_GRAYSCALE)
        assert np.abs(stored.astype(int) - expected_input).mean() < 0.5, name

    assert main(["results", "--data-dir", str(settings.data_dir), "--format", "json"]) == 0
    shown = {row["file_name"]: row for row in json.loads(capsys.readouterr().out)["images"]}
    assert shown["negative.dcm"]["flags"] == ["qc_polarity_corrected"]
    assert shown["turned.dcm"]["flags"] == ["qc_orientation_corrected"]
    assert all(row["model_version"] == model.version for row in shown.values())
    assert main(["results", "--data-dir", str(settings.data_dir)]) == 0
    assert "qc_orientation_corrected" in capsys.readouterr().out
    assert main(["status", "--data-dir", str(settings.data_dir), "--json"]) == 0
    quality = json.loads(capsys.readouterr().out)["quality"]
    assert quality["orientation"] == {"correct": 1, "pass": 2}
    assert quality["polarity"] == {"correct": 1, "pass": 2}
