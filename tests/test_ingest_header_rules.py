"""Tests for ingest/header_rules.py: animals, and views named only in descriptions, on an edited real chest file."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from covid_cxr.reasons import Reason
from ingest.header_rules import HEADER_RULES_VERSION, described_view, non_human_evidence
from ingest.quality import QualityPolicy
from ingest.reader import ReaderPolicy, read_radiograph

SECRET = b"test-secret"
POLICY = ReaderPolicy(frozenset({"CR", "DX"}), 60_000_000, "reject", SECRET)
FLAG_ONLY = ReaderPolicy(frozenset({"CR", "DX"}), 60_000_000, "reject", SECRET,
                         QualityPolicy(species="flag", described_view="flag"))
SMALL_CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"


def _code(value: str, scheme: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return Sequence([item])


def _chest(dicom_dir: Path, **changes: object) -> bytes:
    """The shared 440 x 440 CR chest (ViewPosition PA) with header elements set (``None`` deletes one)."""
    ds = pydicom.dcmread(dicom_dir / SMALL_CHEST)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _header(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


# --- species -------------------------------------------------------------------------------------


@pytest.mark.parametrize("elements", [
    {"PatientSpeciesDescription": "CANINE"},
    {"PatientSpeciesCodeSequence": _code("448771007", "SCT", "Canis lupus familiaris")},
    {"PatientBreedDescription": "Beagle"},
    {"PatientBreedCodeSequence": _code("132543003", "SCT", "Beagle dog breed")},
    {"PatientSexNeutered": "ALTERED"},
    {"ResponsiblePersonRole": "OWNER"},
    {"AcquisitionDeviceProcessingDescription": "CANINE LATERAL THORAX"},  # the file
    {"StudyDescription": "DOG THORAX 2V"},
    {"InstitutionName": "City Veterinary Clinic"},
    {"PatientName": "Rex^Canine"},  # only an unmistakable word counts in a name
], ids=lambda elements: next(iter(elements)))
def test_an_animal_is_rejected_as_not_human(dicom_dir: Path, elements: dict[str, object]) -> None:
    result = read_radiograph(_chest(dicom_dir, **elements), POLICY)
    assert result.reason == Reason.NOT_HUMAN, result.to_dict()["message"]
    (check,) = result.quality
    assert (check.check, check.decision, check.finding, check.version) == (
        "species", "reject", "not_human", HEADER_RULES_VERSION)
    assert next(iter(elements)) in check.evidence


@pytest.mark.parametrize("elements", [
    {"PatientName": "Cat^Alice"},  # a person called Cat
    {"PatientName": "Bird^Fox", "ReferringPhysicianName": "Wolf^Hund"},
    {"ResponsiblePersonRole": "PARENT", "ResponsiblePerson": "Cat^Bob"},
    {"PatientSpeciesDescription": "Homo sapiens", "StudyDescription": "CHEST AFTER DOG BITE"},  # the tag decides
    {"PatientSpeciesCodeSequence": _code("337915000", "SCT", "Homo sapiens"), "InstitutionName": "Animal Road 5"},
    {"StudyDescription": "PET CT FOLLOW-UP; CALF PAIN"},  # PET and CALF name human examinations too
], ids=["name-cat", "names", "parent", "species-tag", "species-code", "pet-calf"])
def test_a_human_is_not_taken_for_an_animal(dicom_dir: Path, elements: dict[str, object]) -> None:
    result = read_radiograph(_chest(dicom_dir, **elements), POLICY)
    assert result.accepted, result.to_dict()["message"]
    assert not any(flag.startswith("qc_species") for flag in result.flags)


def test_a_person_named_in_the_evidence_is_never_shown() -> None:
    evidence = non_human_evidence(_header(PatientName="Rex^Canine"))
    assert evidence is not None and "Rex" not in evidence and "Canine" not in evidence


def test_the_flag_policy_accepts_an_animal_and_flags_it(dicom_dir: Path) -> None:
    result = read_radiograph(_chest(dicom_dir, PatientSpeciesDescription="FELINE"), FLAG_ONLY)
    assert result.accepted and "qc_species_flagged" in result.flags
    assert result.quality[0].decision == "flag"
    assert result.to_dict()["quality"][0]["evidence"] == "PatientSpeciesDescription is 'FELINE'"


# --- views named in descriptions -----------------------------------------------------------------


@pytest.mark.parametrize("elements, expected", [
    ({"SeriesDescription": "LAT"}, ("SeriesDescription", "lateral")),
    ({"ProtocolName": "CHEST_LATERAL"}, ("ProtocolName", "lateral")),
    ({"ViewCodeSequence": _code("399182009", "SCT", "lateral")}, ("ViewCodeSequence", "lateral")),
    ({"SeriesDescription": "LEFT LATERAL DECUBITUS"}, ("SeriesDescription", "decubitus")),
    ({"SeriesDescription": "RAO"}, ("SeriesDescription", "oblique")),
    ({"StudyDescription": "CHEST PA AND LAT"}, None),  # a study of two views
    ({"SeriesDescription": "PA", "StudyDescription": "CHEST LATERAL"}, None),  # the image's own text first
    ({"ViewCodeSequence": _code("399348003", "SCT", "postero-anterior"), "StudyDescription": "LAT"}, None),
    ({"SeriesDescription": "PLATE 2, LATERALITY R"}, None),  # LAT only as a word of its own
    ({"SeriesDescription": "CHEST"}, None),
])
def test_described_view_follows_the_precedence(elements: dict[str, object],
                                               expected: tuple[str, str] | None) -> None:
    assert described_view(_header(**elements)) == expected


def test_a_lateral_named_only_in_a_description_is_rejected(dicom_dir: Path) -> None:
    result = read_radiograph(_chest(dicom_dir, ViewPosition="", SeriesDescription="CHEST LAT"), POLICY)
    assert result.reason == Reason.LATERAL_VIEW
    assert "SeriesDescription" in result.rejection.message
    assert [(c.check, c.finding) for c in result.quality] == [("described_view", "lateral_view")]


def test_view_position_decides_when_present(dicom_dir: Path) -> None:
    result = read_radiograph(_chest(dicom_dir, ViewPosition="PA", SeriesDescription="LATERAL"), POLICY)
    assert result.accepted and result.flags == ()


def test_decubitus_in_a_description_is_flagged_like_such_a_view_position(dicom_dir: Path) -> None:
    result = read_radiograph(_chest(dicom_dir, ViewPosition=None, SeriesDescription="LT LATERAL DECUBITUS"), POLICY)
    assert result.accepted
    assert result.flags == ("view_unknown", "view_not_frontal")


def test_the_flag_policy_accepts_a_described_lateral_and_flags_it(dicom_dir: Path) -> None:
    result = read_radiograph(_chest(dicom_dir, ViewPosition=None, ProtocolName="THORAX LAT"), FLAG_ONLY)
    assert result.accepted and "qc_described_view_flagged" in result.flags
