"""Tests for delivery/sr.py, content.py and documents.py: the report a study result becomes, read back with highdicom,
checked by dciodvfy and rendered by dsrdump; new versions, per-image reports, missing sources.

Real chest DICOM files go through the real ingester; predictions and study results are written by the
worker's own ``store_predictions`` (no model runs here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dicom_results import (
    MODEL_SHA256,
    MODEL_VERSION,
    SMALL_CHEST,
    chest_copy,
    ingest_files,
    predict,
    register_model,
    require_tools,
    run_tool,
)
from pydicom.uid import generate_uid
from service_fixtures import embedded_settings
from sqlalchemy import select

from covid_cxr.errors import ConfigurationError
from covid_cxr.settings import Settings
from db.migrate import upgrade
from db.models import Delivery, ResultDocument
from db.session import session_scope
from delivery.content import COVID_PROBABILITY, DECISION_THRESHOLD, RESEARCH_USE_STATEMENT, SUSPECTED_COVID_19
from delivery.outbox import outbox_summary
from delivery.runner import OutboxRunner


@dataclass
class Study:
    settings: Settings
    study_uid: str
    model_id: int
    sources: list[pydicom.Dataset]
    instance_ids: list[int]
    dicom_dir: Path

    def add_image(self, name: str, prob_covid: float, view_position: str = "AP") -> pydicom.Dataset:
        """One more image of this study, ingested and predicted."""
        source = chest_copy(self.dicom_dir / SMALL_CHEST, self.settings.inbox / name, study_uid=self.study_uid,
                            view_position=view_position)
        ids = ingest_files(self.settings, [self.settings.inbox / name])
        predict(self.settings, ids, [prob_covid], model_id=self.model_id)
        self.sources.append(source)
        self.instance_ids += ids
        return source


def make_study(tmp_path: Path, dicom_dir: Path, **overrides: object) -> Study:
    settings = embedded_settings(tmp_path / "data", dicom_destinations=f"out=folder:{tmp_path / 'out'}",
                                 delivery_retry_seconds=0.05, **overrides)
    upgrade(settings)
    study = Study(settings, generate_uid(), register_model(settings), [], [], dicom_dir)
    for name, view in (("a.dcm", "PA"), ("b.dcm", "AP")):
        study.sources.append(chest_copy(dicom_dir / SMALL_CHEST, settings.inbox / name, study_uid=study.study_uid,
                                        view_position=view))
    study.instance_ids = ingest_files(settings, [settings.inbox / "a.dcm", settings.inbox / "b.dcm"])
    predict(settings, study.instance_ids, [0.7, 0.2], model_id=study.model_id)
    return study


def delivered_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "out").rglob("*.dcm"), key=lambda p: p.stat().st_mtime_ns)


def measurement_values(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, float]:
    return {m.name.meaning: m.value for m in group.get_measurements()}


def text_values(dataset: pydicom.Dataset, meaning: str) -> list[str]:
    """Every TEXT content item with concept name ``meaning`` anywhere in the tree."""
    found = []
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            found.append(item.TextValue)
        found += text_values(item, meaning)
    return found


def test_a_study_result_becomes_one_valid_report_in_the_images_study(tmp_path, dicom_dir):
    study = make_study(tmp_path, dicom_dir)
    report = OutboxRunner(study.settings).run_once()
    assert len(report.made) == 1 and report.delivered == 1
    [path] = delivered_files(tmp_path)
    document = hd.sr.srread(path)

    assert isinstance(document, hd.sr.ComprehensiveSR)
    assert document.StudyInstanceUID == study.study_uid and document.Modality == "SR"
    assert document.SeriesInstanceUID not in {s.SeriesInstanceUID for s in study.sources}
    for keyword in ("PatientName", "PatientID", "AccessionNumber"):  # from the archived source, not the database
        assert str(document[keyword].value) == str(study.sources[0][keyword].value)
    assert {uid[2] for uid in document.get_evidence()} == {s.SOPInstanceUID for s in study.sources}

    main, *per_image = document.content.get_image_measurement_groups()
    assert measurement_values(main) == {COVID_PROBABILITY.meaning: pytest.approx(0.7),
                                        DECISION_THRESHOLD.meaning: 0.5}
    [suspected] = main.get_qualitative_evaluations()
    assert (suspected.name, suspected.value.meaning) == (SUSPECTED_COVID_19, "Yes")
    assert {image.referenced_sop_instance_uid for image in main.source_images} == \
        {s.SOPInstanceUID for s in study.sources}
    assert sorted(measurement_values(g)[COVID_PROBABILITY.meaning] for g in per_image) == \
        pytest.approx([0.2, 0.7])

    assert text_values(document, "Algorithm Version")[0] == MODEL_VERSION
    assert f"sha256={MODEL_SHA256}" in text_values(document, "Algorithm Parameters")
    # Besides the model: the source image's acquisition equipment and highdicom itself (added by highdicom).
    [equipment] = [item for item in document.ContributingEquipmentSequence
                   if MODEL_VERSION in item.get("SoftwareVersions", [])]
    assert equipment.ManufacturerModelName == "covid-cxr"
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    assert MODEL_SHA256 in equipment.ContributionDescription and "cxr-norm" in equipment.ContributionDescription
    assert text_values(document, "Comment") == [RESEARCH_USE_STATEMENT]
    assert "RESEARCH USE ONLY" in document.SeriesDescription
    assert (document.VerificationFlag, document.PreliminaryFlag, document.CompletionFlag) == \
        ("UNVERIFIED", "PRELIMINARY", "COMPLETE")

    with session_scope(study.settings) as session:
        row = session.scalars(select(ResultDocument)).one()
        delivery = session.scalars(select(Delivery)).one()
        assert (row.version, row.n_images, row.label, row.kind) == (1, 2, "covid", "study")
        assert row.sop_instance_uid == document.SOPInstanceUID and row.model_version == MODEL_VERSION
        assert (delivery.destination, delivery.state, delivery.attempts) == ("out", "delivered", 1)
    assert OutboxRunner(study.settings).run_once().busy is False  # nothing changed: nothing made or sent


def test_the_report_passes_dciodvfy_and_dsrdump_renders_it(tmp_path, dicom_dir):
    require_tools("dciodvfy", "dsrdump")
    study = make_study(tmp_path, dicom_dir)
    OutboxRunner(study.settings).run_once()
    [path] = delivered_files(tmp_path)
    checked = run_tool("dciodvfy", str(path))
    assert "ComprehensiveSR" in checked.stdout
    assert [line for line in checked.stdout.splitlines() if line.startswith("Error")] == [], checked.stdout
    rendered = run_tool("dsrdump", str(path))
    assert rendered.returncode == 0, rendered.stdout
    for text in ("Comprehensive SR Document", "Suspected COVID-19", "Probability of COVID-19", MODEL_VERSION,
                 "RESEARCH USE ONLY"):
        assert text in rendered.stdout, text


def test_a_study_that_changes_gets_a_new_version_referencing_the_previous(tmp_path, dicom_dir):
    study = make_study(tmp_path, dicom_dir)
    runner = OutboxRunner(study.settings)
    runner.run_once()
    study.add_image("c.dcm", 0.9)
    assert len(runner.run_once().made) == 1
    first, second = (hd.sr.srread(p) for p in delivered_files(tmp_path))
    assert second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    assert len(second.get_evidence()) == 3
    assert measurement_values(second.content.get_image_measurement_groups()[0])[COVID_PROBABILITY.meaning] == \
        pytest.approx(0.9)

    # An oblique film touches the study result without changing it (only frontal views count): no new version.
    study.add_image("d.dcm", 0.99, view_position="RAO")
    assert runner.run_once().made == []
    with session_scope(study.settings) as session:
        rows = session.scalars(select(ResultDocument).order_by(ResultDocument.version)).all()
        assert [(r.version, r.predecessor_id, r.n_images) for r in rows] == [(1, None, 2), (2, rows[0].id, 3)]


def test_per_image_reports_when_configured(tmp_path, dicom_dir):
    study = make_study(tmp_path, dicom_dir, dicom_sr_per_image=True)
    report = OutboxRunner(study.settings).run_once()
    assert sorted(key.split(":")[0] for key in report.made) == ["image", "image", "study"]
    images = [hd.sr.srread(p) for p in delivered_files(tmp_path) if hd.sr.srread(p).SeriesNumber == 9901]
    assert {d.get_evidence()[0][2] for d in images} == {s.SOPInstanceUID for s in study.sources}


def test_a_missing_source_file_holds_the_report_back_until_it_is_readable(tmp_path, dicom_dir):
    study = make_study(tmp_path, dicom_dir)
    archived = next(study.settings.archive.rglob("a.dcm"))
    hidden = archived.with_name("elsewhere")
    archived.rename(hidden)
    runner = OutboxRunner(study.settings)
    assert runner.run_once().made == []
    with session_scope(study.settings) as session:
        assert outbox_summary(session)["results_without_report"] == 1
    hidden.rename(archived)
    report = runner.run_once()
    while not report.made:  # the retry waits delivery_retry_seconds (50 ms here)
        report = runner.run_once()
    with session_scope(study.settings) as session:
        assert outbox_summary(session)["results_without_report"] == 0


def test_reports_need_the_source_files(tmp_path):
    with pytest.raises(ConfigurationError, match="AFTER_INGEST"):
        OutboxRunner(embedded_settings(tmp_path, after_ingest="delete", dicom_destinations="a=folder:/tmp/x"))


def test_the_docs_show_what_dsrdump_prints_for_a_report(tmp_path, dicom_dir):
    """docs/dicom.md's example is this report's dsrdump output (UIDs and times aside)."""
    require_tools("dsrdump")
    study = make_study(tmp_path, dicom_dir)
    OutboxRunner(study.settings).run_once()
    [path] = delivered_files(tmp_path)
    page = (Path(__file__).resolve().parents[1] / "docs" / "dicom.md").read_text(encoding="utf-8")
    example = page.split("$ dsrdump +Pc +Pu report.dcm\n", 1)[1].split("```", 1)[0]
    printed = run_tool("dsrdump", "+Pc", "+Pu", str(path)).stdout
    assert masked(example).strip() == masked(printed).strip()


def masked(text: str) -> str:
    """``text`` with UIDs and date-times replaced, so two reports of the same results compare equal."""
    text = re.sub(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", "<time>", text)
    return re.sub(r"\d+(?:\.\d+){2,}", "<uid>", text)
