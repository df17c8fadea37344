"""The project's one exception hierarchy; every error carries a stable machine-readable reason code."""

from __future__ import annotations

from typing import Any

from covid_cxr.reasons import Reason


class CovidCxrError(Exception):
    """Base of every error covid-cxr raises on purpose.

    ``reason`` is a stable code from the catalogue (:class:`~covid_cxr.reasons.Reason`) that is
    stored, counted and matched on; ``message`` is for humans and may change between releases.
    """

    default_reason: Reason = Reason.ERROR

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.reason: Reason = reason or self.default_reason
        self.message: str = message

    def __str__(self) -> str:
        return f"{self.message} [{self.reason}]"

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickles only ``args`` and would lose the keyword-only reason code; decode
        # processes send rejections back to the ingester pickled.
        return _rebuild, (type(self), self.message, self.reason)


def _rebuild(cls: type[CovidCxrError], message: str, reason: Reason) -> CovidCxrError:
    return cls(message, reason=reason)


class ConfigurationError(CovidCxrError):
    """Settings are missing or invalid; raised at start-up so a bad config fails fast."""

    default_reason = Reason.BAD_CONFIGURATION


class InputRejected(CovidCxrError):
    """An input file cannot be used; ``reason`` is a :class:`~covid_cxr.reasons.Reason` of kind rejection."""

    default_reason = Reason.REJECTED


class UsageError(CovidCxrError):
    """Bad command-line input (a missing file, an option out of range); the command exits with code 2."""

    default_reason = Reason.USAGE


class DatasetError(CovidCxrError):
    """A training or evaluation dataset is unusable (empty, one class, unknown labels...)."""

    default_reason = Reason.BAD_DATASET


class ModelError(CovidCxrError):
    """A model artifact cannot be built, found, verified or loaded."""

    default_reason = Reason.MODEL_ERROR


class ModelIntegrityError(ModelError):
    """An artifact's sha256 does not match its record, or it is not loadable in safe mode."""

    default_reason = Reason.MODEL_INTEGRITY


class NoActiveModel(ModelError):
    """No model is active, so nothing can serve predictions."""

    default_reason = Reason.NO_ACTIVE_MODEL


class DatabaseError(CovidCxrError):
    """The database is unreachable or its schema is not at the expected revision."""

    default_reason = Reason.DATABASE_ERROR


class SchemaOutOfDate(DatabaseError):
    """The schema revision differs from the code's head; run ``covid-cxr db upgrade``."""

    default_reason = Reason.SCHEMA_OUT_OF_DATE


class LabelImportError(CovidCxrError):
    """A ground-truth labels file cannot be read at all (per-row problems are reported, not raised)."""

    default_reason = Reason.BAD_LABELS_FILE
