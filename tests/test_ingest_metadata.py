"""Tests for ingest/metadata.py: the kept header fields and the patient pseudonym."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from ingest.metadata import InstanceMetadata, pseudonymize, sop_class_name, transfer_syntax_of

SECRET = b"metadata-secret"

CONTRACT_FIELDS = [
    "study_instance_uid", "series_instance_uid", "sop_instance_uid", "sop_class_uid", "modality", "view_position",
    "body_part_examined", "study_date", "accession_number", "manufacturer", "rows", "columns",
    "photometric_interpretation", "transfer_syntax_uid", "bits_stored", "number_of_frames", "patient_pseudonym",
    "institution_name", "patient_sex", "age_band",
]


def test_fields_are_the_contract_and_hold_no_clear_patient_data() -> None:
    names = [field.name for field in dataclasses.fields(InstanceMetadata)]
    assert names == CONTRACT_FIELDS
    assert not {"patient_id", "patient_name", "patient_birth_date", "patient_age"} & set(names)
    with pytest.raises(dataclasses.FrozenInstanceError):
        InstanceMetadata().modality = "CR"  # type: ignore[misc]


def test_from_a_real_header(dicom_dir: Path) -> None:
    path = dicom_dir / "pydicom-data__RG1_J2KI.dcm"
    ds = pydicom.dcmread(path)
    meta = InstanceMetadata.from_dataset(ds, pseudonym_secret=SECRET)
    assert meta.to_dict() == {
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "sop_instance_uid": ds.SOPInstanceUID,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
        "modality": "CR",
        "view_position": "PA",
        "body_part_examined": "CHEST",
        "study_date": ds.StudyDate,
        "accession_number": ds.AccessionNumber,
        "manufacturer": ds.Manufacturer,
        "rows": 1955,
        "columns": 1841,
        "photometric_interpretation": "MONOCHROME1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.4.91",
        "bits_stored": 15,
        "number_of_frames": None,
        "patient_pseudonym": pseudonymize(str(ds.PatientID), SECRET),
        "institution_name": meta.institution_name,
        "patient_sex": meta.patient_sex,
        "age_band": meta.age_band,
    }


def test_empty_values_become_none(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "orthanc-tests__Monochrome1-Jpeg.dcm", stop_before_pixels=True)
    assert ds.BodyPartExamined == "" and ds.ViewPosition == ""
    meta = InstanceMetadata.from_dataset(ds, pseudonym_secret=SECRET)
    assert meta.body_part_examined is None and meta.view_position is None and meta.modality == "CR"


def test_damaged_values_become_none_instead_of_failing(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "dwv__gdcm-CR-MONO1-10-chest.dcm", stop_before_pixels=True)
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 4, b"two ", 0, False, True)  # NumberOfFrames
    ds[0x00080060] = RawDataElement(Tag(0x00080060), "XX", 2, b"CR", 0, False, True)  # Modality, unknown VR
    meta = InstanceMetadata.from_dataset(ds, pseudonym_secret=SECRET)
    assert meta.number_of_frames is None and meta.modality is None and meta.rows == 440


def test_no_patient_id_no_pseudonym(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "dwv__gdcm-CR-MONO1-10-chest.dcm", stop_before_pixels=True)
    assert "PatientID" not in ds
    assert InstanceMetadata.from_dataset(ds, pseudonym_secret=SECRET).patient_pseudonym is None


def test_dicomdir_takes_its_sop_class_from_the_file_meta() -> None:
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    meta = InstanceMetadata.from_dataset(pydicom.dcmread(path), pseudonym_secret=SECRET)
    assert meta.sop_class_uid == "1.2.840.10008.1.3.10"
    assert sop_class_name(meta.sop_class_uid) == "Media Storage Directory Storage"
    assert sop_class_name("1.2.3.4") is None and sop_class_name(None) is None


def test_transfer_syntax_is_inferred_without_file_meta(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "dwv__gdcm-CR-MONO1-10-chest.dcm", stop_before_pixels=True)
    assert transfer_syntax_of(ds) == pydicom.uid.ExplicitVRLittleEndian
    del ds.file_meta.TransferSyntaxUID
    ds.set_original_encoding(True, True)
    assert transfer_syntax_of(ds) == pydicom.uid.ImplicitVRLittleEndian
    ds.set_original_encoding(False, False)
    assert transfer_syntax_of(ds) == pydicom.uid.ExplicitVRBigEndian


def test_pseudonym_is_hmac_sha256_of_the_id() -> None:
    expected = hmac.new(SECRET, b"PAT-001", hashlib.sha256).hexdigest()
    assert pseudonymize("PAT-001", SECRET) == expected
    assert pseudonymize(" PAT-001 ", SECRET) == expected, "DICOM padding spaces do not change the pseudonym"
    assert len(expected) == 64 and "PAT" not in expected
    assert pseudonymize("PAT-001", b"other secret") != expected
    assert pseudonymize("PAT-002", SECRET) != expected
    assert pseudonymize("PAT-001", SECRET) != hashlib.sha256(b"PAT-001").hexdigest(), "keyed, not a plain hash"


def test_pseudonym_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        pseudonymize("PAT-001", b"")


@pytest.mark.parametrize(("elements", "sex", "band"), [
    ({"PatientSex": "F", "PatientAge": "066Y"}, "F", "60-69"),
    ({"PatientSex": "m", "PatientAge": "007M"}, "M", "0-9"),
    ({"PatientSex": "X", "PatientBirthDate": "19500315", "StudyDate": "20200301"}, None, "60-69"),  # 69 years
    ({"PatientBirthDate": "19500301", "StudyDate": "20200301"}, None, "70-79"),  # the 70th birthday
    ({"PatientAge": "garbage", "PatientBirthDate": "1950"}, None, None),
])
def test_sex_and_age_band_are_kept_and_nothing_finer(elements: dict[str, str], sex: str | None,
                                                      band: str | None) -> None:
    ds = pydicom.Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    meta = InstanceMetadata.from_dataset(ds, pseudonym_secret=SECRET)
    assert (meta.patient_sex, meta.age_band) == (sex, band)
    assert not any(value in str(meta.to_dict()) for value in ("066Y", "19500315", "19500301", "007M"))
