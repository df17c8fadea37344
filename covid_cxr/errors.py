"""The project's one exception hierarchy; every error carries a stable machine-readable reason code."""

from __future__ import annotations


class CovidCxrError(Exception):
    """Base of every error covid-cxr raises on purpose.

    ``reason`` is a stable snake_case code that is stored, counted and matched on;
    ``message`` is for humans and may change between releases.
    """

    default_reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason: str = reason or self.default_reason
        self.message: str = message

    def __str__(self) -> str:
        return f"{self.message} [{self.reason}]"

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}


class ConfigurationError(CovidCxrError):
    """Settings are missing or invalid; raised at start-up so a bad config fails fast."""

    default_reason = "bad_configuration"


class InputRejected(CovidCxrError):
    """An input file cannot be used; ``reason`` is one of :class:`ingest.reasons.RejectReason`."""

    default_reason = "rejected"


class DatasetError(CovidCxrError):
    """A training or evaluation dataset is unusable (empty, one class, unknown labels...)."""

    default_reason = "bad_dataset"


class ModelError(CovidCxrError):
    """A model artifact cannot be built, found, verified or loaded."""

    default_reason = "model_error"


class ModelIntegrityError(ModelError):
    """An artifact's sha256 does not match its record, or it is not loadable in safe mode."""

    default_reason = "model_integrity"


class NoActiveModel(ModelError):
    """No model is active, so nothing can serve predictions."""

    default_reason = "no_active_model"


class DatabaseError(CovidCxrError):
    """The database is unreachable or its schema is not at the expected revision."""

    default_reason = "database_error"


class SchemaOutOfDate(DatabaseError):
    """The schema revision differs from the code's head; run ``covid-cxr db upgrade``."""

    default_reason = "schema_out_of_date"


class LabelImportError(CovidCxrError):
    """A ground-truth labels file cannot be read at all (per-row problems are reported, not raised)."""

    default_reason = "bad_labels_file"
