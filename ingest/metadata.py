"""The DICOM header facts kept for each instance, with the patient id only as a keyed hash."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict, dataclass
from typing import Any

import pydicom
from pydicom import config
from pydicom.multival import MultiValue
from pydicom.uid import UID

# pydicom's reading validation quotes offending element values in its warnings and logs
# ("Invalid value for VR LO: 'the patient id'"), so a malformed PatientID would reach the
# logs in clear. Files from the wild are read tolerantly anyway: values are never validated
# on reading in a process that imports ingest.
config.settings.reading_validation_mode = config.IGNORE

#: Header keywords copied verbatim (as str) into :class:`InstanceMetadata`.
_STRING_KEYWORDS: dict[str, str] = {
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "modality": "Modality",
    "view_position": "ViewPosition",
    "body_part_examined": "BodyPartExamined",
    "study_date": "StudyDate",
    "accession_number": "AccessionNumber",
    "manufacturer": "Manufacturer",
    "institution_name": "InstitutionName",
    "photometric_interpretation": "PhotometricInterpretation",
}
#: PatientSex values kept (PS3.3 C.7.1.1); anything else is stored as ``None``.
_SEXES = frozenset({"M", "F", "O"})
#: Header keywords copied as int.
_INT_KEYWORDS: dict[str, str] = {
    "rows": "Rows",
    "columns": "Columns",
    "bits_stored": "BitsStored",
    "number_of_frames": "NumberOfFrames",
}


@dataclass(frozen=True)
class InstanceMetadata:
    """What covid-cxr keeps from a DICOM header; every field is optional because files from the wild omit things.

    Field names are the snake_case forms of the DICOM keywords (``SOPInstanceUID`` ->
    ``sop_instance_uid``). Empty strings in the header are stored as ``None``. The patient id
    is never kept: only :attr:`patient_pseudonym`, an HMAC-SHA256 of it (see :func:`pseudonymize`).
    """

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    view_position: str | None = None
    body_part_examined: str | None = None
    study_date: str | None = None
    accession_number: str | None = None
    manufacturer: str | None = None
    rows: int | None = None
    columns: int | None = None
    photometric_interpretation: str | None = None
    transfer_syntax_uid: str | None = None
    bits_stored: int | None = None
    number_of_frames: int | None = None
    patient_pseudonym: str | None = None
    institution_name: str | None = None
    #: ``M``, ``F`` or ``O``; and the age as a decade band only (``"60-69"``), for subgroup reports.
    patient_sex: str | None = None
    age_band: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of all fields (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset, *, pseudonym_secret: bytes) -> InstanceMetadata:
        """Collect the kept fields from a (possibly damaged) dataset; unreadable values become ``None``.

        ``SOPClassUID`` falls back to the file meta's ``MediaStorageSOPClassUID`` (DICOMDIR has
        only the latter); ``TransferSyntaxUID`` comes from the file meta, or from the encoding
        pydicom detected when the file has no meta.
        """
        values: dict[str, Any] = {field: _text(ds, keyword) for field, keyword in _STRING_KEYWORDS.items()}
        values.update({field: _integer(ds, keyword) for field, keyword in _INT_KEYWORDS.items()})
        file_meta = getattr(ds, "file_meta", None)
        if values["sop_class_uid"] is None and file_meta is not None:
            values["sop_class_uid"] = _text(file_meta, "MediaStorageSOPClassUID")
        values["transfer_syntax_uid"] = transfer_syntax_of(ds)
        patient_id = _text(ds, "PatientID")
        values["patient_pseudonym"] = pseudonymize(patient_id, pseudonym_secret) if patient_id else None
        if values["institution_name"]:
            values["institution_name"] = values["institution_name"][:64]  # LO: at most 64 characters
        sex = (_text(ds, "PatientSex") or "").upper()
        values["patient_sex"] = sex if sex in _SEXES else None
        values["age_band"] = age_band(_text(ds, "PatientAge")) or age_band(
            _age_from_dates(_text(ds, "PatientBirthDate"), values["study_date"]))
        return cls(**values)


def age_band(age: str | None) -> str | None:
    """A decade band (``"60-69"``) from an age in years (``"66"``) or a DICOM AS value (``"066Y"``; months, weeks
    and days give ``"0-9"``); ``None`` when there is no plausible age. Only the band is ever kept."""
    text = (age or "").strip().upper()
    if not text:
        return None
    unit, digits = (text[-1], text[:-1]) if text[-1] in "YMWD" else ("Y", text)
    try:
        years = float(digits) if unit == "Y" else 0.0
    except ValueError:
        return None
    if not 0 <= years <= 130:
        return None
    low = int(years // 10) * 10
    return f"{low}-{low + 9}"


def _age_from_dates(birth_date: str | None, study_date: str | None) -> str | None:
    """Whole years between two DICOM DA values (``YYYYMMDD``), as text; ``None`` if either is unreadable."""
    if not birth_date or not study_date or len(birth_date) < 8 or len(study_date) < 8:
        return None
    try:
        born = (int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:8]))
        studied = (int(study_date[:4]), int(study_date[4:6]), int(study_date[6:8]))
    except ValueError:
        return None
    return str(studied[0] - born[0] - (1 if studied[1:] < born[1:] else 0))


def pseudonymize(patient_id: str, secret: bytes) -> str:
    """Keyed hash of a patient id: hex HMAC-SHA256 of the UTF-8 id (surrounding spaces removed).

    The same id and secret always give the same pseudonym, so studies of one patient can be
    grouped; without the secret the id cannot be recovered by hashing candidate ids. Never
    log the clear id.

    Raises ``ValueError`` for an empty secret (an unkeyed hash of an id is not a pseudonym).
    """
    if not secret:
        raise ValueError("pseudonym secret must not be empty")
    return hmac.new(secret, patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()


def transfer_syntax_of(ds: pydicom.Dataset) -> str | None:
    """The dataset's Transfer Syntax UID: from the file meta, else the one implied by how pydicom read it.

    Without file meta only the three uncompressed syntaxes can be inferred (encapsulated pixel
    data cannot be told apart without it); ``None`` when even that is unknown.
    """
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        stated = _text(file_meta, "TransferSyntaxUID")
        if stated:
            return stated
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    if implicit:
        return str(pydicom.uid.ImplicitVRLittleEndian) if little else None
    return str(pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """``str`` of the first value of ``keyword``, or ``None`` when absent, empty or unreadable."""
    try:
        value = ds.get(keyword)
    except Exception:  # a damaged value must not make the whole header unreadable
        return None
    if value is None:
        return None
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    text = str(value).strip().strip("\x00") if value is not None else ""
    return text or None


def _integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value is not None and str(value).strip() != "" else None
    except Exception:  # e.g. a non-numeric IS value or a wrong-length US
        return None


def sop_class_name(uid: str | None) -> str | None:
    """pydicom's name for a SOP Class UID (``"Computed Radiography Image Storage"``), ``None`` if unknown."""
    if not uid:
        return None
    name = UID(uid).name
    return name if name != uid else None
