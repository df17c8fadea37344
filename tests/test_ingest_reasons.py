"""Tests for ingest/reasons.py: stable codes, each described, and the README table in step with them."""

from __future__ import annotations

import re
from pathlib import Path

from ingest.reasons import RejectReason

README = Path(__file__).resolve().parents[1] / "README.md"

REQUIRED = {
    "not_dicom", "truncated", "no_pixel_data", "not_an_image", "unsupported_transfer_syntax", "decode_failed",
    "unsupported_photometric", "wrong_modality", "wrong_body_part", "lateral_view", "multi_frame", "too_large",
}


def test_codes_are_stable_snake_case_strings_with_descriptions() -> None:
    values = {reason.value for reason in RejectReason}
    assert values >= REQUIRED
    for reason in RejectReason:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", reason.value)
        assert reason == reason.value and str(reason) == reason.value, "stored and compared as plain text"
        assert reason.description and not reason.description.endswith(".")
