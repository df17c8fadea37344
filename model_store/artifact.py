"""A model artifact: ``model.keras`` plus ``metadata.json`` (version, sha256, provenance); verified before loading."""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_cxr.constants import CLASS_NAMES
from covid_cxr.errors import ModelError, ModelIntegrityError
from covid_cxr.hashing import file_sha256
from covid_cxr.reasons import Reason
from covid_cxr.safe_output import printable

if TYPE_CHECKING:
    import keras

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
#: Metadata keys that every artifact must carry (point 3 of issue 3).
REQUIRED_METADATA = ("name", "version", "sha256", "created_at", "architecture", "base_weights",
                     "preprocessing_version", "class_names", "decision_threshold")


@dataclass(frozen=True)
class ArtifactInfo:
    """Where an artifact was written and what identifies it."""

    directory: Path
    model_path: Path
    metadata_path: Path
    version: str
    sha256: str
    metadata: dict[str, Any]


def make_version(created_at: datetime, sha256: str) -> str:
    """``YYYYMMDD-HHMMSS-<first 8 hex of sha256>`` (UTC): sortable, and names the bytes."""
    return f"{created_at.astimezone(UTC):%Y%m%d-%H%M%S}-{sha256[:8]}"


def save_artifact(model: keras.Model, metadata: dict[str, Any], out_dir: Path) -> ArtifactInfo:
    """Write ``model.keras`` (no optimizer state) and ``metadata.json`` into ``out_dir``.

    ``metadata`` is completed with ``version``, ``sha256`` (of ``model.keras``), ``created_at`` (UTC, ISO 8601),
    ``model_file`` and ``model_bytes``; the caller's dict is not modified. An existing artifact is not overwritten.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    metadata_path = out_dir / METADATA_FILE
    if model_path.exists() or metadata_path.exists():
        raise ModelError(f"{out_dir} already holds an artifact; choose another output folder",
                         reason=Reason.ARTIFACT_EXISTS)
    created_at = datetime.now(UTC)
    partial = out_dir / (MODEL_FILE + ".partial.keras")
    model.save(partial, include_optimizer=False)
    partial.replace(model_path)
    sha256 = file_sha256(model_path)
    completed = dict(metadata)
    completed.update({
        "version": make_version(created_at, sha256),
        "sha256": sha256,
        "created_at": created_at.isoformat(),
        "model_file": MODEL_FILE,
        "model_bytes": model_path.stat().st_size,
    })
    metadata_path.write_text(json.dumps(completed, indent=2, sort_keys=False, default=_json_default) + "\n")
    return ArtifactInfo(out_dir, model_path, metadata_path, completed["version"], sha256, completed)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, datetime)):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


#: What a model name or version may be: they become folder names (the model cache, exports).
_IDENTIFIER = re.compile(r"[A-Za-z0-9._-]+")


def check_identifier(value: object, what: str) -> str:
    """``value`` if it is a safe model name or version; :class:`ModelError` (``invalid_model_name``) otherwise."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value) or ".." in value or len(value) > 64:
        raise ModelError(f"model {what} {printable(repr(value))} is not allowed: use 1 to 64 letters, digits, "
                         f"'.', '_' and '-' (and no '..')", reason=Reason.INVALID_MODEL_NAME)
    return value


def read_metadata(directory_or_model: Path) -> dict[str, Any]:
    """The ``metadata.json`` beside a ``model.keras`` (or inside an artifact folder), checked for required keys.

    Its name and version must be safe identifiers (:func:`check_identifier`): they name folders.
    """
    path = Path(directory_or_model)
    metadata_path = path / METADATA_FILE if path.is_dir() else path.with_name(METADATA_FILE)
    if not metadata_path.is_file():
        raise ModelError(f"no {METADATA_FILE} found at {metadata_path}", reason=Reason.ARTIFACT_INCOMPLETE)
    try:
        metadata = json.loads(metadata_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{metadata_path} is not valid JSON: {exc}", reason=Reason.ARTIFACT_INCOMPLETE) from exc
    if not isinstance(metadata, dict):
        raise ModelError(f"{metadata_path} is not a JSON object", reason=Reason.ARTIFACT_INCOMPLETE)
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ModelError(f"{metadata_path} lacks {', '.join(missing)}", reason=Reason.ARTIFACT_INCOMPLETE)
    check_identifier(metadata["name"], "name")
    check_identifier(metadata["version"], "version")
    return metadata


def model_path_of(directory_or_model: Path) -> Path:
    path = Path(directory_or_model)
    return path / MODEL_FILE if path.is_dir() else path


def verify_sha256(path: Path, expected_sha256: str) -> None:
    """Raise :class:`ModelIntegrityError` unless the file's sha256 equals ``expected_sha256``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist", reason=Reason.ARTIFACT_MISSING)
    actual = file_sha256(path)
    if not hmac.compare_digest(actual, expected_sha256.lower()):
        raise ModelIntegrityError(
            f"{path} has sha256 {actual}, but its record says {expected_sha256}: the file was changed or "
            "corrupted after it was registered; refusing to load it", reason=Reason.SHA256_MISMATCH)


def load_verified_model(path: Path, expected_sha256: str) -> keras.Model:
    """Load a ``.keras`` model only if its sha256 matches, and only in Keras safe mode (no arbitrary code).

    Raises
    ------
    ModelIntegrityError
        ``sha256_mismatch`` when the bytes differ from the record; otherwise as :func:`load_model_file`.
    """
    verify_sha256(path, expected_sha256)
    return load_model_file(path)


def load_model_file(path: Path) -> keras.Model:
    """Load a ``.keras`` model whose sha256 the caller has just verified, in Keras safe mode (no arbitrary code).

    Callers that have not verified the file use :func:`load_verified_model`; the registry's
    :func:`~model_store.registry.load_registered_model` verifies while fetching, so the file is hashed once.

    Raises
    ------
    ModelIntegrityError
        ``unsafe_or_invalid`` when Keras refuses the file in safe mode (e.g. a Lambda layer carrying Python
        bytecode) or cannot read it; ``wrong_io`` when the model does not map ``(N, 224, 224, 3)`` to ``(N, 2)``.
    """
    import keras

    from model_store.architecture import INPUT_SHAPE

    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError/TypeError/zip errors; all mean "do not serve this"
        raise ModelIntegrityError(f"{path} cannot be loaded in Keras safe mode: {type(exc).__name__}: {exc}",
                                  reason=Reason.UNSAFE_OR_INVALID) from exc
    input_shape = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    output_shape = tuple(model.output_shape[1:]) if not isinstance(model.output_shape, list) else None
    if input_shape != INPUT_SHAPE or output_shape != (len(CLASS_NAMES),):
        raise ModelIntegrityError(f"{path} maps {model.input_shape} to {model.output_shape}; expected "
                                  f"(None, {', '.join(map(str, INPUT_SHAPE))}) to (None, {len(CLASS_NAMES)})",
                                  reason=Reason.WRONG_IO)
    return model
