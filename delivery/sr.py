"""The result report: a Comprehensive SR (TID 1500 measurement report) in the evaluated images' study.

Patient and study attributes come from the evaluated images themselves (their archived DICOM
headers), so the report files next to them in any archive; the database keeps only pseudonyms.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset

from delivery.content import (
    MANUFACTURER,
    PLAIN_CHEST_XRAY,
    SERIES_DESCRIPTION,
    Finding,
    Provenance,
    local_coding_scheme,
    research_use_comment,
)

#: Series numbers of the result series, high so that viewers list them after the images.
STUDY_SERIES_NUMBER = 9900
IMAGE_SERIES_NUMBER = 9901
#: Patient and General Study attributes of type 2 that highdicom copies from the first image; absent ones
#: become empty (a file from the wild may lack them, and an SR must carry them, empty or not).
_TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                  "StudyDate", "StudyTime", "ReferringPhysicianName")
#: highdicom warns about single-component person names ("Anonymized"), which are common in the wild.
_PERSON_NAME_WARNING = re.compile(r"^The string .* is unlikely to represent the intended person name")


def read_source_header(path: str | Path) -> Dataset:
    """The header of an archived image (no pixel data), ready to be evidence of a report.

    Raises ``OSError`` or ``pydicom.errors.InvalidDicomError`` when the file cannot be read.
    """
    header = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in _TYPE_2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def build_report(*, evidence: Sequence[Dataset], findings: Sequence[Finding], provenance: Provenance,
                 rule: str | None, series_instance_uid: str, series_number: int, sop_instance_uid: str,
                 instance_number: int, previous_version: Dataset | None = None) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR holding ``findings`` (one measurement group each) about the ``evidence`` images.

    The first finding is the report's main one (the study result); ``rule`` is its study rule.
    ``previous_version`` is the report this one supersedes (Predecessor Documents Sequence).
    The report is complete, preliminary (an AI result is never the final report) and unverified.
    """
    if not evidence:
        raise ValueError("a report needs at least one evaluated image as evidence")
    if not findings:
        raise ValueError("a report needs at least one finding")
    groups = [finding.measurement_group(provenance, rule if index == 0 else None)
              for index, finding in enumerate(findings)]
    report = hd.sr.MeasurementReport(observation_context=provenance.observation_context(),
                                     procedure_reported=PLAIN_CHEST_XRAY, imaging_measurements=groups)
    report[0].ContentSequence.append(research_use_comment())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING.pattern, category=UserWarning)
        document = hd.sr.ComprehensiveSR(
            evidence=list(evidence),
            content=report[0],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=[previous_version] if previous_version is not None else None,
            contributing_equipment=[provenance.contributing_equipment()],
            series_description=SERIES_DESCRIPTION,
            software_versions=provenance.software_version,
            coding_schemes=[local_coding_scheme()],
        )
    return document


def to_bytes(document: Dataset) -> bytes:
    """The report as a DICOM file (Part 10: preamble, file meta, dataset)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, document, enforce_file_format=True)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Dataset:
    """A stored report read back."""
    return pydicom.dcmread(io.BytesIO(data))
