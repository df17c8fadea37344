"""Codestream frame headers against Rows x Columns, and the cheap guards before parsing (size, DICM then zeros)."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pydicom
import pytest
from bombs import J2K_CHEST, JPEG_CHEST, j2k_siz_bomb, jpeg_sof_bomb, zeros_after_dicm

from covid_cxr.errors import InputRejected
from ingest.codestream import check_codestream_matches, read_codestream_header
from ingest.limits import check_file_size
from ingest.reader import ReaderPolicy, read_radiograph

POLICY = ReaderPolicy(frozenset({"CR", "DX"}), 60_000_000, "reject", b"k" * 32)
JPEG_LS = "pylibjpeg-data__RG1_JLSN.dcm"  # the RG1 chest as JPEG-LS


def _first_codestream(ds: pydicom.Dataset) -> bytes:
    return next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))


def test_every_shared_codestream_declares_its_header_size(dicom_dir: Path) -> None:
    kinds = set()
    for path in sorted(dicom_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        syntax = ds.file_meta.TransferSyntaxUID
        if not syntax.is_compressed or syntax == pydicom.uid.RLELossless:
            continue
        header = check_codestream_matches(_first_codestream(ds), ds.Rows, ds.Columns, ds.SamplesPerPixel, "x")
        assert (header.rows, header.columns, header.components) == (ds.Rows, ds.Columns, 1), path.name
        kinds.add(header.kind)
    assert kinds == {"jpeg", "jpeg-ls", "jpeg2000"}


def test_the_wavelet_of_each_shared_jpeg_2000_codestream_is_read_from_its_cod_segment(dicom_dir: Path) -> None:
    """The four shared JPEG 2000 files: the three "Lossless Only" ones use the reversible 5/3 wavelet, RG1's lossy
    one the irreversible 9/7 (what decides whether OpenJPH may decode an HTJ2K codestream)."""
    found = {}
    for path in sorted(dicom_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID in pydicom.uid.JPEG2000TransferSyntaxes:
            found[path.name] = read_codestream_header(_first_codestream(ds)).reversible
    assert found == {"pydicom-data__RG1_J2KI.dcm": False, "pydicom-data__RG3_J2KR.dcm": True,
                     "pylibjpeg-data__966_fixed.dcm": True, "pylibjpeg-data__NM_Kakadu44_SOTmarkerincons.dcm": True}


@pytest.mark.parametrize("bomb", ["jpeg2000", "jpeg", "jpeg-ls"])
def test_a_codestream_declaring_a_huge_image_is_rejected_before_decoding(dicom_dir: Path, bomb: str) -> None:
    if bomb == "jpeg2000":
        data = j2k_siz_bomb(dicom_dir / J2K_CHEST)
    elif bomb == "jpeg":
        data = jpeg_sof_bomb(dicom_dir / JPEG_CHEST)
    else:
        patched = bytearray((dicom_dir / JPEG_LS).read_bytes())
        sof55 = patched.index(b"\xff\xf7")
        struct.pack_into(">HH", patched, sof55 + 5, 50000, 50000)
        data = bytes(patched)
    started = time.process_time()
    result = read_radiograph(data, POLICY)
    assert time.process_time() - started < 0.5
    assert not result.accepted and result.reason == "codestream_mismatch"
    assert "codestream declares" in result.rejection.message and "0000 x " in result.rejection.message
    assert result.metadata is not None and result.metadata.sop_instance_uid  # the UIDs are still recorded


def test_a_bomb_whose_header_agrees_is_too_large_by_its_pixel_count(dicom_dir: Path) -> None:
    result = read_radiograph(j2k_siz_bomb(dicom_dir / J2K_CHEST, header_too=True), POLICY)
    assert not result.accepted and result.reason == "too_large"


def test_a_jpeg_height_deferred_to_a_dnl_marker_is_accepted_when_the_width_matches(dicom_dir: Path) -> None:
    codestream = bytearray(_first_codestream(pydicom.dcmread(dicom_dir / JPEG_CHEST)))
    sof = codestream.index(b"\xff\xc0")
    struct.pack_into(">H", codestream, sof + 5, 0)
    assert read_codestream_header(bytes(codestream)).rows == 0
    check_codestream_matches(bytes(codestream), 1024, 1024, 1, "JPEG")
    struct.pack_into(">H", codestream, sof + 7, 2048)
    with pytest.raises(InputRejected, match="declares 0 x 2048") as caught:
        check_codestream_matches(bytes(codestream), 1024, 1024, 1, "JPEG")
    assert caught.value.reason == "codestream_mismatch"


def test_an_unreadable_frame_header_is_decode_failed() -> None:
    with pytest.raises(InputRejected) as caught:
        check_codestream_matches(b"\xff\xd8\xff\xda\x00\x08", 10, 10, 1, "JPEG")
    assert caught.value.reason == "decode_failed"


@pytest.mark.parametrize("with_file_meta", [False, True])
def test_zeros_after_dicm_are_not_dicom_at_once(dicom_dir: Path, with_file_meta: bool) -> None:
    data = zeros_after_dicm(20 << 20)
    if with_file_meta:  # a real file meta group, then zeros
        real = (dicom_dir / "dwv__gdcm-CR-MONO1-10-chest.dcm").read_bytes()
        group_length = struct.unpack_from("<I", real, 140)[0]
        data = real[: 144 + group_length] + bytes(20 << 20)
    started = time.process_time()
    result = read_radiograph(data, POLICY)
    assert time.process_time() - started < 0.5
    assert not result.accepted and result.reason == "not_dicom"


def test_file_size_limit() -> None:
    check_file_size(100, 100)
    with pytest.raises(InputRejected, match="101 bytes, more than the limit of 100") as caught:
        check_file_size(101, 100)
    assert caught.value.reason == "too_large"
