"""Stable reason codes for rejected input files, each with a one-line human description."""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Why an input file was not turned into a model input.

    The value is the code that is stored, counted and matched on; it never changes once
    released. :attr:`description` is the human explanation used in the README and the CLI.
    """

    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    NO_PIXEL_DATA = "no_pixel_data"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    DECODE_FAILED = "decode_failed"
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    WRONG_MODALITY = "wrong_modality"
    WRONG_BODY_PART = "wrong_body_part"
    LATERAL_VIEW = "lateral_view"
    MULTI_FRAME = "multi_frame"
    TOO_LARGE = "too_large"
    INTERNAL_ERROR = "internal_error"

    @property
    def description(self) -> str:
        """What the code means, for operators (one sentence, no trailing period)."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[RejectReason, str] = {
    RejectReason.NOT_DICOM: "Empty, not DICOM at all (no DICM prefix and no plausible DICOM elements), or a header "
    "that cannot be parsed as DICOM",
    RejectReason.TRUNCATED: "A DICOM file that ends too early: an element, the pixel data or its delimiter is cut "
    "off, or a JPEG / JPEG 2000 codestream lacks its end marker",
    RejectReason.NO_PIXEL_DATA: "An image object without Pixel Data (e.g. pixel data stripped by an export)",
    RejectReason.NOT_AN_IMAGE: "A non-image DICOM object (structured report, presentation state, key object "
    "selection, DICOMDIR, waveform, RT plan or dose, segmentation, encapsulated document)",
    RejectReason.UNSUPPORTED_TRANSFER_SYNTAX: "Pixel data compressed with a transfer syntax no installed decoder "
    "handles (the message names the missing decoder)",
    RejectReason.DECODE_FAILED: "The decoder or the modality LUT failed on this file's pixel data (corrupt or "
    "inconsistent Image Pixel module)",
    RejectReason.UNSUPPORTED_PHOTOMETRIC: "Not a grayscale image: RGB, YBR or PALETTE COLOR (or more than one "
    "sample per pixel)",
    RejectReason.WRONG_MODALITY: "Modality is not one of the accepted radiograph modalities (default CR, DX)",
    RejectReason.WRONG_BODY_PART: "BodyPartExamined names another region than the chest; when it is absent, the "
    "Anatomic Region Sequence, study/series description or protocol name does",
    RejectReason.LATERAL_VIEW: "ViewPosition says lateral (LL, RL, LATERAL); the model only knows frontal views",
    RejectReason.MULTI_FRAME: "More than one frame, and the multi-frame policy is 'reject'",
    RejectReason.TOO_LARGE: "Rows x Columns x NumberOfFrames exceeds the configured pixel limit "
    "(decompression-bomb guard)",
    RejectReason.INTERNAL_ERROR: "An unexpected error inside covid-cxr (a bug, not a property of the file)",
}
