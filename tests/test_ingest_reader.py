"""Tests for ingest/reader.py: the decision for every real file, bad input of every kind, and fuzzed bytes."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covid_cxr.constants import IMAGE_SIZE
from covid_cxr.errors import ConfigurationError, InputRejected
from covid_cxr.reasons import Reason, ReasonKind
from covid_cxr.settings import Settings
from ingest.metadata import InstanceMetadata, pseudonymize
from ingest.quality import QualityPolicy
from ingest.reader import (
    AcceptedResult,
    ReaderPolicy,
    ReadResult,
    RejectedResult,
    check_body_part,
    check_pixel_count,
    check_view,
    frame_to_read,
    read_radiograph,
)

SECRET = b"test-secret"
POLICY = ReaderPolicy(frozenset({"CR", "DX"}), 60_000_000, "reject", SECRET)
#: Lets every modality and multi-frame file reach the pixel pipeline (and through the image checks), to exercise
#: decoding.
PERMISSIVE = ReaderPolicy(
    frozenset({"CR", "DX", "CT", "MR", "US", "OT", "NM", "PT", "XA", "RF", "MG", "SEG", "RTDOSE", "SC", "DOC"}),
    60_000_000,
    "first_frame",
    SECRET,
    QualityPolicy(frontal_chest="flag"),
)
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SMALL_CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"
SIIM = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"

#: What a radiologist expects for each shared file: None = accepted (with these flags), else the reason.
EXPECTED: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "pydicom-data__RG1_J2KI.dcm": (None, ()),  # CR chest PA, MONOCHROME1, JPEG 2000 lossy
    "pylibjpeg-data__RG1_JLSN.dcm": (None, ()),  # the same chest, JPEG-LS near-lossless
    "pylibjpeg-data__966_fixed.dcm": (None, ()),  # DX chest PA, MONOCHROME1 + INVERSE, J2K lossless
    SMALL_CHEST: (None, ()),  # CR chest PA, uncompressed MONOCHROME1
    SIIM: (None, ()),  # secondary capture of a CR chest PA, no window
    "orthanc-tests__Monochrome1-Jpeg.dcm": (None, ("body_part_unknown", "view_unknown")),  # chest, tags empty
    "pylibjpeg-data__RG2_JPLL.dcm": (Reason.WRONG_BODY_PART, ()),  # hip
    "pylibjpeg-data__RG2_JLSL.dcm": (Reason.WRONG_BODY_PART, ()),  # hip
    "pylibjpeg-data__RG2_JPLY_fixed.dcm": (Reason.WRONG_BODY_PART, ()),  # hip
    "pydicom-data__RG3_J2KR.dcm": (Reason.WRONG_BODY_PART, ()),  # lower leg
    "pylibjpeg-data__NM_Kakadu44_SOTmarkerincons.dcm": (Reason.WRONG_BODY_PART, ()),  # hand
    # Dental panoramic: no BodyPartExamined, but StudyDescription says TEETH.
    "fo-dicom__CR-ModalitySequenceLUT.dcm": (Reason.WRONG_BODY_PART, ()),
    "fo-dicom__GH133.dcm": (Reason.WRONG_MODALITY, ()),  # mammogram
    "orthanc-tests__KarstenHilbertRF.dcm": (Reason.WRONG_MODALITY, ()),  # shoulder fluoroscopy
    "dcmfx-pydicom__MR_small_RLE.dcm": (Reason.WRONG_MODALITY, ()),  # MR
}


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def _assert_well_formed(result: ReadResult, data: bytes) -> None:
    assert isinstance(result, ReadResult)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    if result.accepted:
        assert result.image.shape == (IMAGE_SIZE, IMAGE_SIZE) and result.image.dtype == np.uint8
        assert result.steps[0] == "decode"
    else:
        assert isinstance(result.rejection, InputRejected) and not hasattr(result, "image")
        assert result.rejection.reason.kind is ReasonKind.REJECTION
        assert result.rejection.message


# --- every real file ----------------------------------------------------------------------------


def test_every_shared_file_has_an_expectation(dicom_dir: Path) -> None:
    with open(dicom_dir / "manifest.csv", newline="") as handle:
        assert sorted(row["file"] for row in csv.DictReader(handle)) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_file_gets_the_decision_a_radiologist_expects(dicom_dir: Path, name: str) -> None:
    expected_reason, expected_flags = EXPECTED[name]
    data = (dicom_dir / name).read_bytes()
    result = read_radiograph(dicom_dir / name, POLICY)

    _assert_well_formed(result, data)
    assert result.reason == expected_reason, result.to_dict()["message"]
    assert result.flags == expected_flags
    header = pydicom.dcmread(dicom_dir / name, stop_before_pixels=True)
    assert result.metadata is not None, "metadata is kept for rejections too"
    assert result.metadata.sop_instance_uid == header.SOPInstanceUID
    assert result.metadata.transfer_syntax_uid == header.file_meta.TransferSyntaxUID
    if expected_reason is None:
        assert result.image.std() > 20


def test_path_and_bytes_give_the_same_result_whatever_the_file_name(dicom_dir: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "IM000001"  # exports often have no .dcm suffix
    renamed.write_bytes((dicom_dir / SMALL_CHEST).read_bytes())
    from_path = read_radiograph(renamed, POLICY)
    from_bytes = read_radiograph(renamed.read_bytes(), POLICY)
    assert from_path.accepted and from_bytes.accepted
    np.testing.assert_array_equal(from_path.image, from_bytes.image)
    assert from_path.metadata == from_bytes.metadata


def test_file_without_preamble_and_file_meta_is_read(dicom_dir: Path) -> None:
    data = (dicom_dir / SMALL_CHEST).read_bytes()
    header = pydicom.dcmread(dicom_dir / SMALL_CHEST, stop_before_pixels=True)
    meta_length = header.file_meta.FileMetaInformationGroupLength
    bare = data[132 + 12 + meta_length :]  # the dataset alone, Explicit VR Little Endian
    assert bare[:2] == b"\x08\x00"
    result = read_radiograph(bare, POLICY)
    assert result.accepted, result.rejection
    assert result.metadata.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(result.image, read_radiograph(data, POLICY).image)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("test-SR.dcm", Reason.NOT_AN_IMAGE),
        ("reportsi.dcm", Reason.NOT_AN_IMAGE),
        ("dicomdirtests/DICOMDIR", Reason.NOT_AN_IMAGE),
        ("rtplan.dcm", Reason.NOT_AN_IMAGE),
        ("waveform_ecg.dcm", Reason.NOT_AN_IMAGE),
        ("ExplVR_LitEndNoMeta.dcm", Reason.NOT_AN_IMAGE),  # no preamble, no meta: still read
        ("MR_truncated.dcm", Reason.TRUNCATED),
        ("rtplan_truncated.dcm", Reason.TRUNCATED),
        ("CT_small.dcm", Reason.WRONG_MODALITY),
        ("SC_rgb_jpeg_dcmtk.dcm", Reason.WRONG_MODALITY),
        ("README.txt", Reason.NOT_DICOM),
    ],
)
def test_pydicom_test_files_under_the_default_policy(name: str, reason: Reason) -> None:
    path = PYDICOM_TEST_FILES / name
    if not path.exists():
        pytest.skip(f"{name} is not bundled with this pydicom")
    assert read_radiograph(path, POLICY).reason == reason


@pytest.mark.parametrize(
    "name, reason",
    [
        ("SC_rgb_rle.dcm", Reason.UNSUPPORTED_PHOTOMETRIC),
        ("SC_ybr_full_422_uncompressed.dcm", Reason.UNSUPPORTED_PHOTOMETRIC),
        ("examples_palette.dcm", Reason.UNSUPPORTED_PHOTOMETRIC),
        ("examples_ybr_color.dcm", Reason.UNSUPPORTED_PHOTOMETRIC),
        ("MR_small_bigendian.dcm", None),
        ("MR_small_jpeg_ls_lossless.dcm", None),
        ("image_dfl.dcm", None),  # deflated explicit VR little endian
        ("liver_1frame.dcm", Reason.NOT_AN_IMAGE),  # segmentation
        ("rtdose.dcm", Reason.NOT_AN_IMAGE),
    ],
)
def test_pydicom_test_files_reaching_the_pixel_pipeline(name: str, reason: Reason | None) -> None:
    path = PYDICOM_TEST_FILES / name
    if not path.exists():
        pytest.skip(f"{name} is not bundled with this pydicom")
    assert read_radiograph(path, PERMISSIVE).reason == reason


def test_every_bundled_pydicom_test_file_gets_a_typed_answer() -> None:
    """Only the files installed with pydicom are used: nothing is downloaded."""
    files = sorted(path for path in PYDICOM_TEST_FILES.rglob("*") if path.is_file())
    assert len(files) > 50
    for path in files:
        data = path.read_bytes()
        for policy in (POLICY, PERMISSIVE):
            result = read_radiograph(data, policy)
            _assert_well_formed(result, data)
            assert result.reason != Reason.INTERNAL_ERROR, f"{path.name}: {result.rejection}"


# --- policy checks on real files ------------------------------------------------------------------


def _chest(dicom_dir: Path, **changes: object) -> bytes:
    ds = pydicom.dcmread(dicom_dir / SMALL_CHEST)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return _to_bytes(ds)


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "lat"])
def test_lateral_view_is_rejected(dicom_dir: Path, view: str) -> None:
    assert read_radiograph(_chest(dicom_dir, ViewPosition=view), POLICY).reason == Reason.LATERAL_VIEW


def test_unknown_view_is_accepted_and_flagged(dicom_dir: Path) -> None:
    for view in (None, ""):
        result = read_radiograph(_chest(dicom_dir, ViewPosition=view), POLICY)
        assert result.accepted and "view_unknown" in result.flags
    oblique = read_radiograph(_chest(dicom_dir, ViewPosition="LLO"), POLICY)
    assert oblique.accepted and "view_not_frontal" in oblique.flags


@pytest.mark.parametrize("body_part, reason", [("SKULL", Reason.WRONG_BODY_PART), ("PORT CHEST", None),
                                               ("THORAX", None), ("TSPINE", Reason.WRONG_BODY_PART)])
def test_body_part_examined_decides_when_present(dicom_dir: Path, body_part: str, reason: str | None) -> None:
    assert read_radiograph(_chest(dicom_dir, BodyPartExamined=body_part), POLICY).reason == reason


def test_absent_body_part_is_accepted_unless_a_description_names_another_region(dicom_dir: Path) -> None:
    plain = read_radiograph(_chest(dicom_dir, BodyPartExamined=None), POLICY)
    assert plain.accepted and "body_part_unknown" in plain.flags
    knee = _chest(dicom_dir, BodyPartExamined=None, SeriesDescription="KNEE AP")
    assert read_radiograph(knee, POLICY).reason == Reason.WRONG_BODY_PART
    both = _chest(dicom_dir, BodyPartExamined=None, StudyDescription="CHEST ABDOMEN")
    assert read_radiograph(both, POLICY).accepted


def test_allowed_modalities_are_configurable(dicom_dir: Path) -> None:
    ct = _chest(dicom_dir, Modality="CT")
    assert read_radiograph(ct, POLICY).reason == Reason.WRONG_MODALITY
    with_ct = ReaderPolicy(frozenset({"ct"}), 60_000_000, "reject", SECRET)
    assert read_radiograph(ct, with_ct).accepted
    assert read_radiograph(_chest(dicom_dir, Modality=None), POLICY).reason == Reason.WRONG_MODALITY


def _two_frames(dicom_dir: Path) -> bytes:
    ds = pydicom.dcmread(dicom_dir / SMALL_CHEST)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData + ds.PixelData[::-1]
    return _to_bytes(ds)


def test_multi_frame_is_rejected_by_default_and_first_frame_policy_reads_frame_one(dicom_dir: Path) -> None:
    data = _two_frames(dicom_dir)
    assert read_radiograph(data, POLICY).reason == Reason.MULTI_FRAME
    first = ReaderPolicy(frozenset({"CR", "DX"}), 60_000_000, "first_frame", SECRET)
    result = read_radiograph(data, first)
    assert result.accepted and "first_frame_only" in result.flags
    np.testing.assert_array_equal(result.image, read_radiograph(dicom_dir / SMALL_CHEST, POLICY).image)


def test_huge_declared_size_is_rejected_before_any_decoding(dicom_dir: Path) -> None:
    data = _chest(dicom_dir, Rows=65535, Columns=65535)
    started = time.perf_counter()
    result = read_radiograph(data, POLICY)
    assert result.reason == Reason.TOO_LARGE
    assert time.perf_counter() - started < 1.0
    assert "4294836225" in result.rejection.message
    small_limit = ReaderPolicy(frozenset({"CR"}), 440 * 440 - 1, "reject", SECRET)
    assert read_radiograph(dicom_dir / SMALL_CHEST, small_limit).reason == Reason.TOO_LARGE


# --- bad input ------------------------------------------------------------------------------------


def test_empty_file_is_not_dicom() -> None:
    result = read_radiograph(b"", POLICY)
    assert result.reason == Reason.NOT_DICOM and result.metadata is None
    assert result.sha256 == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("seed, size", [(0, 1), (1, 131), (2, 132), (3, 4096), (4, 300_000)])
def test_random_bytes_are_not_dicom(seed: int, size: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert read_radiograph(data, POLICY).reason == Reason.NOT_DICOM


def test_random_bytes_behind_a_dicm_prefix_are_not_accepted() -> None:
    noise = np.random.default_rng(5).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    result = read_radiograph(b"\0" * 128 + b"DICM" + noise, POLICY)
    assert result.reason in {Reason.NOT_DICOM, Reason.TRUNCATED}


@pytest.mark.parametrize("name", [SMALL_CHEST, SIIM, "pydicom-data__RG1_J2KI.dcm"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9, 0.999])
def test_file_cut_inside_its_pixel_data_is_truncated_and_keeps_its_metadata(
    dicom_dir: Path, name: str, fraction: float
) -> None:
    data = (dicom_dir / name).read_bytes()
    result = read_radiograph(data[: int(len(data) * fraction)], POLICY)
    assert result.reason == Reason.TRUNCATED
    assert result.metadata is not None and result.metadata.sop_instance_uid, "UIDs are needed for duplicates"


@pytest.mark.parametrize("name", [SMALL_CHEST, SIIM, "pydicom-data__RG1_J2KI.dcm"])
def test_file_missing_only_its_last_bytes_is_truncated(dicom_dir: Path, name: str) -> None:
    data = (dicom_dir / name).read_bytes()
    for cut in (1, 2, 7):
        assert read_radiograph(data[:-cut], POLICY).reason == Reason.TRUNCATED


@pytest.mark.parametrize("keyword, into_value", [("Rows", 1), ("StudyInstanceUID", 5), ("Modality", 1)])
def test_file_cut_inside_a_header_element_is_truncated(dicom_dir: Path, keyword: str, into_value: int) -> None:
    ds = pydicom.dcmread(dicom_dir / SMALL_CHEST)
    element = ds.get_item(keyword, keep_deferred=True)
    data = (dicom_dir / SMALL_CHEST).read_bytes()
    assert read_radiograph(data[: element.value_tell + into_value], POLICY).reason == Reason.TRUNCATED


def test_file_cut_inside_its_file_meta_is_truncated(dicom_dir: Path) -> None:
    data = (dicom_dir / SMALL_CHEST).read_bytes()
    for size in (140, 200, 300):
        assert read_radiograph(data[:size], POLICY).reason == Reason.TRUNCATED
    assert read_radiograph(data[:100], POLICY).reason == Reason.NOT_DICOM  # not even the DICM prefix


def test_file_with_pixel_data_removed_is_no_pixel_data(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / SIIM)
    del ds.PixelData
    result = read_radiograph(_to_bytes(ds), POLICY)
    assert result.reason == Reason.NO_PIXEL_DATA
    assert result.metadata.sop_instance_uid == ds.SOPInstanceUID


def _mutate(data: bytes, edits: list[tuple[float, int]], cut: float | None, header_bias: bool) -> bytes:
    mutated = bytearray(data)
    for where, value in edits:
        span = min(len(mutated), 4096) if header_bias else len(mutated)
        mutated[int(where * (span - 1))] = value
    if cut is not None:
        mutated = mutated[: int(cut * len(mutated))]
    return bytes(mutated)


_FUZZED = (SMALL_CHEST, SIIM, "dcmfx-pydicom__MR_small_RLE.dcm", "orthanc-tests__KarstenHilbertRF.dcm")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(_FUZZED),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.none() | st.floats(0, 1),
    header_bias=st.booleans(),
    permissive=st.booleans(),
)
def test_mutated_real_files_always_get_a_result_or_a_typed_rejection(
    dicom_dir: Path, name: str, edits: list[tuple[float, int]], cut: float | None, header_bias: bool, permissive: bool
) -> None:
    data = _mutate((dicom_dir / name).read_bytes(), edits, cut, header_bias)
    result = read_radiograph(data, PERMISSIVE if permissive else POLICY)
    _assert_well_formed(result, data)
    assert result.reason != Reason.INTERNAL_ERROR, result.rejection


# --- privacy ------------------------------------------------------------------------------------


def test_patient_id_is_kept_only_as_a_keyed_hash_and_never_logged(
    dicom_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clear_id, clear_name = "PID-4711-SECRET", "Doe^Jane"
    ds = pydicom.dcmread(dicom_dir / SMALL_CHEST)
    ds.PatientID, ds.PatientName = clear_id, clear_name
    ds.BodyPartExamined = "ABDOMEN"  # a rejection is logged at INFO
    accepted = _chest(dicom_dir, PatientID=clear_id + "x" * 80, PatientName=clear_name)  # too long for LO
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rejected = read_radiograph(_to_bytes(ds), POLICY)
        read_radiograph(accepted, POLICY)
        read_radiograph(_to_bytes(ds)[:-1000], POLICY)
    assert rejected.reason == Reason.WRONG_BODY_PART
    assert rejected.metadata.patient_pseudonym == pseudonymize(clear_id, SECRET)
    text = caplog.text + " ".join(str(w.message) for w in caught)
    assert "sop_instance_uid=" + ds.SOPInstanceUID in caplog.text
    assert "4711" not in text and "Doe" not in text
    assert "4711" not in str(rejected.to_dict()) and "Doe" not in str(rejected.to_dict())


def test_read_result_to_dict_is_json_ready(dicom_dir: Path) -> None:
    import json

    result = read_radiograph(dicom_dir / SMALL_CHEST, POLICY)
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["accepted"] is True and summary["reason"] is None
    assert summary["steps"] == list(result.steps) and summary["metadata"]["modality"] == "CR"


def test_a_result_is_accepted_with_the_model_input_or_rejected_with_a_reason(dicom_dir: Path) -> None:
    accepted = read_radiograph(dicom_dir / SMALL_CHEST, POLICY)
    assert isinstance(accepted, AcceptedResult)
    with pytest.raises(ValueError, match="224, 224"):
        AcceptedResult(accepted.sha256, accepted.metadata, accepted.image[:100], accepted.steps)
    rejected = read_radiograph(b"not dicom", POLICY)
    assert isinstance(rejected, RejectedResult) and rejected.reason == rejected.rejection.reason == "not_dicom"


def test_a_sha256_the_caller_computed_is_used_as_it_is(dicom_dir: Path) -> None:
    digest = "ab" * 32
    assert read_radiograph(dicom_dir / SMALL_CHEST, POLICY, sha256=digest).sha256 == digest


# --- single steps -------------------------------------------------------------------------------


def test_view_step_rejects_lateral_and_flags_unknown_or_unusual_views() -> None:
    assert check_view(InstanceMetadata(view_position="pa")) == ()
    assert check_view(InstanceMetadata()) == ("view_unknown",)
    assert check_view(InstanceMetadata(view_position="LLO")) == ("view_not_frontal",)
    with pytest.raises(InputRejected) as rejected:
        check_view(InstanceMetadata(view_position="LL"))
    assert rejected.value.reason == Reason.LATERAL_VIEW


def test_body_part_step_flags_a_header_that_names_no_region() -> None:
    assert check_body_part(pydicom.Dataset(), InstanceMetadata(body_part_examined="CHEST")) == ()
    assert check_body_part(pydicom.Dataset(), InstanceMetadata()) == ("body_part_unknown",)
    with pytest.raises(InputRejected, match="KNEE"):
        check_body_part(pydicom.Dataset(), InstanceMetadata(body_part_examined="KNEE"))


def test_frame_and_size_steps_follow_the_policy() -> None:
    first_frame = ReaderPolicy(frozenset({"CR"}), 1000, "first_frame", SECRET)
    assert frame_to_read(InstanceMetadata(number_of_frames=1), POLICY) is None
    assert frame_to_read(InstanceMetadata(number_of_frames=3), first_frame) == 0
    with pytest.raises(InputRejected, match="3 frames"):
        frame_to_read(InstanceMetadata(number_of_frames=3), POLICY)
    check_pixel_count(InstanceMetadata(rows=10, columns=100), first_frame)
    with pytest.raises(InputRejected) as rejected:
        check_pixel_count(InstanceMetadata(rows=10, columns=100, number_of_frames=2), first_frame)
    assert rejected.value.reason == Reason.TOO_LARGE


# --- the policy object ------------------------------------------------------------------------------


def test_policy_validates_its_fields() -> None:
    with pytest.raises(ValueError):
        ReaderPolicy(frozenset(), 1, "reject", SECRET)
    with pytest.raises(ValueError):
        ReaderPolicy(frozenset({"CR"}), 0, "reject", SECRET)
    with pytest.raises(ValueError):
        ReaderPolicy(frozenset({"CR"}), 1, "all_frames", SECRET)
    with pytest.raises(ValueError):
        ReaderPolicy(frozenset({"CR"}), 1, "reject", b"")
    assert ReaderPolicy(frozenset({" dx "}), 1, "reject", SECRET).allowed_modalities == {"DX"}
    assert "test-secret" not in repr(POLICY)


def test_policy_from_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, allowed_modalities="CR,DX,RF", max_pixels=1000,
                        multi_frame_policy="first_frame", pseudonym_key="k3y" * 11)
    policy = ReaderPolicy.from_settings(settings)
    assert policy == ReaderPolicy(frozenset({"CR", "DX", "RF"}), 1000, "first_frame", b"k3y" * 11)
    with pytest.raises(ConfigurationError):
        ReaderPolicy.from_settings(Settings(data_dir=tmp_path, allowed_modalities="", pseudonym_key="k" * 32))


def test_ingest_stays_light_no_tensorflow() -> None:
    """The reader runs in the watcher process: importing it must not pull in TensorFlow or Keras."""
    code = ("import sys, ingest.reader, ingest.pixels, ingest.inspect, ingest.cli; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert completed.stdout.strip() == "[]"


def test_a_decoder_panic_is_a_decode_failure_not_a_crash(dicom_dir: Path) -> None:
    """The Rust RLE decoder panics (a BaseException, not an Exception) on this one-byte change; found by hypothesis."""
    data = bytearray((dicom_dir / "dcmfx-pydicom__MR_small_RLE.dcm").read_bytes())
    pixel_data_start = len(data) - len(pydicom.dcmread(io.BytesIO(bytes(data))).PixelData)
    data[pixel_data_start + 1235] = 202
    result = read_radiograph(bytes(data), PERMISSIVE)
    assert result.reason == Reason.DECODE_FAILED and "PanicException" in result.rejection.message
