"""Stable reason codes of failed result deliveries and documents, each with a one-line human description."""

from __future__ import annotations

from enum import StrEnum


class DeliveryReason(StrEnum):
    """Why a document could not be made or sent; the value is stored in ``deliveries.reason`` and never changes."""

    DESTINATION_UNREACHABLE = "destination_unreachable"
    ASSOCIATION_REJECTED = "association_rejected"
    SR_NOT_ACCEPTED = "sr_not_accepted"
    STORE_FAILED = "store_failed"
    NO_RESPONSE = "no_response"
    WRITE_FAILED = "write_failed"
    UNKNOWN_DESTINATION = "unknown_destination"
    SOURCE_UNAVAILABLE = "source_unavailable"

    @property
    def description(self) -> str:
        """What the code means, for operators (one sentence, no trailing period)."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[DeliveryReason, str] = {
    DeliveryReason.DESTINATION_UNREACHABLE: "No association could be opened: connection refused, timed out or "
    "aborted by the peer",
    DeliveryReason.ASSOCIATION_REJECTED: "The destination rejected the association (wrong AE titles, or it is busy); "
    "the message carries result, source and diagnostic",
    DeliveryReason.SR_NOT_ACCEPTED: "The destination accepted the association but not the Comprehensive SR storage "
    "class with an uncompressed transfer syntax",
    DeliveryReason.STORE_FAILED: "The destination answered the C-STORE with a failure status (the message gives it "
    "in hex, e.g. 0xA700 out of resources)",
    DeliveryReason.NO_RESPONSE: "The C-STORE got no response: the association was aborted or timed out mid-transfer",
    DeliveryReason.WRITE_FAILED: "A folder destination could not be written (permissions, disk full, missing mount)",
    DeliveryReason.UNKNOWN_DESTINATION: "The row names a destination that is no longer configured; it is "
    "dead-lettered at once",
    DeliveryReason.SOURCE_UNAVAILABLE: "A report could not be made: an evaluated image's archived DICOM file "
    "(instances.stored_path) is missing or unreadable, so its patient and study attributes are unknown",
}
