"""Test helper: wrap a real chest X-ray image (PNG/JPEG from ``../shared/data/cxr``) as a DICOM file.

Two kinds of object:

* ``"DX"``: a Digital X-Ray Image Storage - For Presentation object (pydicom), Modality DX,
  BodyPartExamined CHEST, the given ViewPosition: what a digital radiography system sends.
* ``"SC"``: a Secondary Capture Image Storage object (highdicom), Modality OT: what a scanned
  film or a screenshot becomes, which the default acceptance policy rejects (``wrong_modality``).

The pixels are the file's 8-bit grey values, unchanged (MONOCHROME2, uncompressed), so the DICOM
path of the service sees exactly the image the folder holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1465.1"  # pydicom-style root; only identifies test files


@dataclass(frozen=True)
class WrappedImage:
    """What was written: the file and the identifiers a labels CSV can use."""

    path: Path
    study_instance_uid: str
    sop_instance_uid: str
    accession_number: str


def grey_pixels(image_path: Path) -> np.ndarray:
    """The image as 2-D uint8 grey values (RGB files converted with OpenCV's luma weights)."""
    import cv2

    pixels = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise ValueError(f"{image_path} is not an image OpenCV can read")
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def wrap_as_dicom(image_path: Path, out_path: Path, *, kind: Literal["DX", "SC"] = "DX",
                  study_instance_uid: str | None = None, accession_number: str | None = None,
                  patient_id: str = "TEST-PATIENT", view_position: str = "PA") -> WrappedImage:
    """Write ``image_path``'s pixels as a DICOM file at ``out_path``; new UIDs unless a study UID is given.

    Parameters
    ----------
    kind
        ``"DX"`` (accepted by the service) or ``"SC"`` (Secondary Capture, Modality OT: rejected).
    study_instance_uid, accession_number
        Put several images in one study by passing the same values.
    view_position
        DICOM ViewPosition of the DX object (``PA``, ``AP``...).
    """
    if not 0 < len(patient_id) <= 64:
        raise ValueError(f"PatientID must be 1 to 64 characters (VR LO), got {len(patient_id)}")
    pixels = grey_pixels(image_path)
    study_instance_uid = study_instance_uid or generate_uid()
    accession_number = accession_number or f"ACC{generate_uid()[-12:].replace('.', '')}"
    sop_instance_uid = generate_uid()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "DX":
        dataset = _dx_dataset(pixels, study_instance_uid, sop_instance_uid, accession_number, patient_id, view_position)
    elif kind == "SC":
        dataset = _sc_dataset(pixels, study_instance_uid, sop_instance_uid, accession_number, patient_id)
    else:
        raise ValueError(f"kind must be 'DX' or 'SC', got {kind!r}")
    dataset.save_as(out_path, enforce_file_format=True)
    return WrappedImage(out_path, study_instance_uid, sop_instance_uid, accession_number)


def _dx_dataset(pixels: np.ndarray, study_uid: str, sop_uid: str, accession: str, patient_id: str,
                view_position: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyDate = ds.SeriesDate = "20200316"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.Manufacturer = "covid-cxr test wrap"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def _sc_dataset(pixels: np.ndarray, study_uid: str, sop_uid: str, accession: str, patient_id: str) -> Dataset:
    import highdicom as hd

    image = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=study_uid, series_instance_uid=generate_uid(),
        series_number=1, sop_instance_uid=sop_uid, instance_number=1, manufacturer="covid-cxr test wrap",
        patient_id=patient_id, accession_number=accession, patient_orientation=("L", "F"),
    )
    image.BodyPartExamined = "CHEST"
    return image

