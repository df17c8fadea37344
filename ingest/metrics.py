"""What the ingester measures for :mod:`covid_cxr.metrics`: one observation per recorded file."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from covid_cxr import metrics

if TYPE_CHECKING:
    from ingest.reader import ReadResult


@cache
def known_transfer_syntaxes() -> frozenset[str]:
    """The transfer syntaxes DICOM defines (pydicom's list)."""
    import pydicom.uid

    return frozenset(pydicom.uid.AllTransferSyntaxes)


def transfer_syntax_label(result: ReadResult) -> str | None:
    """The file's TransferSyntaxUID when DICOM defines it, ``other`` when not, ``None`` without a header.

    Any UID a file states could become a label value otherwise, and every one a new series.
    """
    uid = result.metadata.transfer_syntax_uid if result.metadata is not None else None
    if not uid:
        return None
    return uid if uid in known_transfer_syntaxes() else "other"


def observe_file(state: str, reason: str | None, result: ReadResult, decode_seconds: float) -> None:
    """Count one recorded file by state and reason, and how long its decoding took, by transfer syntax."""
    metrics.file_ingested(state, reason, transfer_syntax_label(result), decode_seconds)
