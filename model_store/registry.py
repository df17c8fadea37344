"""The model registry, in the database: one row per (name, version) holding the artifact's bytes; one active per name.

Workers on other machines need only the database: :func:`fetch_artifact` copies a version's bytes into
the local model cache and verifies their sha256 before anything loads them.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import socket
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from covid_cxr.errors import ModelError, ModelIntegrityError, NoActiveModel, UsageError
from covid_cxr.hashing import file_sha256
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.migrate import prepare_database
from db.models import ModelVersion
from db.session import session_scope
from model_store.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    check_identifier,
    load_model_file,
    load_verified_model,
    model_path_of,
    read_metadata,
    verify_sha256,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

HOW_TO_GET_A_MODEL = ("train one with `covid-cxr train ... --register --activate`, or import an artifact with "
                      "`covid-cxr models import PATH --activate`, or activate a listed one with "
                      "`covid-cxr models activate NAME:VERSION`")


def _session(settings: Settings) -> AbstractContextManager[Session]:
    """A session, once the schema is known to be at the code's revision.

    An embedded database is created on first use, as ``serve`` does, so that ``train --activate`` or
    ``models import`` work on a fresh data dir; a server database is only ever checked.
    """
    prepare_database(settings)
    return session_scope(settings)


def import_artifact(settings: Settings, path: Path, activate: bool = False, name: str | None = None,
                    activated_by: str | None = None, force: bool = False) -> ModelVersion:
    """Register an artifact folder (or its ``model.keras``, with ``metadata.json`` beside it).

    The file must match the sha256 in its metadata and load in Keras safe mode; otherwise
    :class:`ModelIntegrityError`. Importing the same bytes again is a no-op; a different file under an
    existing name and version is refused. With ``activate``, ``activated_by`` (see
    :func:`activation_note`) is recorded with the time; a degenerate model is registered but activated only with
    ``force`` (see :func:`activate`).
    """
    model_path = model_path_of(path)
    metadata = read_metadata(path)
    name = check_identifier(name or metadata["name"], "name")
    load_verified_model(model_path, metadata["sha256"])
    artifact = model_path.read_bytes()
    if file_sha256(model_path) != metadata["sha256"]:
        raise ModelIntegrityError(f"{model_path} changed while it was being imported", reason=Reason.SHA256_MISMATCH)
    with _session(settings) as session:
        existing = session.scalar(select(ModelVersion).where(ModelVersion.name == name,
                                                             ModelVersion.version == metadata["version"]))
        if existing is not None:
            if existing.sha256 != metadata["sha256"]:
                raise ModelError(f"{name} {metadata['version']} is already registered with different bytes "
                                 f"(sha256 {existing.sha256})", reason=Reason.VERSION_CONFLICT)
            record = existing
        else:
            record = ModelVersion(name=name, version=metadata["version"], sha256=metadata["sha256"],
                                  created_at=_parse_time(metadata["created_at"]), active=False,
                                  metadata_json={**metadata, "name": name}, artifact=artifact)
            session.add(record)
            session.flush()
        if activate:
            _activate(session, record, _checked_note(record, activated_by, force))
        return record


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _activate(session: Session, record: ModelVersion, activated_by: str | None) -> None:
    # Deactivate first, flushed on its own: the unique partial index allows one active row per name.
    session.execute(update(ModelVersion).where(ModelVersion.name == record.name, ModelVersion.id != record.id)
                    .values(active=False))
    session.flush()
    record.active = True
    record.activated_at = datetime.now(UTC)
    record.activated_by = activated_by
    session.flush()


def activation_note(command: str) -> str:
    """What ``activated_by`` records: the command, and the user and host that ran it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        user = f"uid {os.getuid()}"
    return f"{command} (by {user} on {socket.gethostname()})"


def find(settings: Settings, name: str, version: str | None = None) -> ModelVersion:
    """One registered version; ``version=None`` means the active one."""
    if version is None:
        return get_active(settings, name)
    with _session(settings) as session:
        record = session.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version))
        if record is None:
            known = session.scalars(select(ModelVersion.version).where(ModelVersion.name == name)).all()
            raise ModelError(f"no model {name} version {version} is registered"
                             + (f" (versions: {', '.join(known)})" if known else ""), reason=Reason.MODEL_NOT_FOUND)
        return record


def degenerate_reasons(record: ModelVersion) -> list[str]:
    """Why training flagged this version as degenerate (empty when it did not, or predates the check)."""
    flagged = (record.metadata_json or {}).get("degenerate") or {}
    return [str(reason) for reason in flagged.get("reasons", [])] if flagged.get("degenerate") else []


def _checked_note(record: ModelVersion, activated_by: str | None, force: bool) -> str | None:
    """Refuse a degenerate model unless ``force``; a forced activation says so in ``activated_by``."""
    reasons = degenerate_reasons(record)
    if not reasons:
        return activated_by
    if not force:
        raise ModelError(f"{record.name} {record.version} is degenerate: {'; '.join(reasons)}; not activated "
                         "(use --force to activate it anyway)", reason=Reason.DEGENERATE_MODEL)
    log.warning("activating degenerate model %s %s (forced): %s", record.name, record.version, "; ".join(reasons))
    return f"{activated_by or 'unknown'} [FORCED despite degenerate model: {'; '.join(reasons)}]"


def activate(settings: Settings, name: str, version: str, activated_by: str | None = None,
             force: bool = False, threshold: float | None = None) -> ModelVersion:
    """Make ``name:version`` the one active version of ``name`` (the one the workers serve).

    ``activated_by`` (see :func:`activation_note`) is recorded with the time of activation. A version whose
    training flagged it as degenerate is refused (:class:`ModelError`, ``degenerate_model``) unless ``force``;
    a forced activation is recorded as such in ``activated_by``. ``threshold`` overrides the model's stored
    decision threshold for serving (recorded with the time and ``activated_by``); ``None`` keeps any earlier one.
    """
    if threshold is not None and not 0 < threshold < 1:
        raise UsageError(f"threshold must be in (0, 1), got {threshold}", reason=Reason.BAD_THRESHOLD)
    with _session(settings) as session:
        record = session.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version))
        if record is None:
            raise ModelError(f"no model {name} version {version} is registered", reason=Reason.MODEL_NOT_FOUND)
        _activate(session, record, _checked_note(record, activated_by, force))
        if threshold is not None:
            record.threshold_override = float(threshold)
            record.threshold_set_at = record.activated_at
            record.threshold_set_by = activated_by
        return record


def serving_threshold(record: ModelVersion) -> float:
    """The threshold the workers apply: the override set at activation, else the one stored at training."""
    if record.threshold_override is not None:
        return float(record.threshold_override)
    return float((record.metadata_json or {}).get("decision_threshold", 0.5))


def list_models(settings: Settings) -> list[ModelVersion]:
    """Every registered version, newest first (artifact bytes not loaded)."""
    with _session(settings) as session:
        return list(session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.created_at.desc())))


def get_active(settings: Settings, name: str) -> ModelVersion:
    """The active version of ``name``; :class:`NoActiveModel` says how to get one."""
    with _session(settings) as session:
        record = session.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.active.is_(True)))
        if record is None:
            registered = session.scalar(select(ModelVersion.id).where(ModelVersion.name == name).limit(1))
            state = "none of its registered versions is active" if registered else "no version is registered"
            raise NoActiveModel(f"no active model {name!r} ({state}): {HOW_TO_GET_A_MODEL}")
        return record


def fetch_artifact(settings: Settings, record: ModelVersion) -> Path:
    """Path of a verified local copy of ``record``'s ``model.keras`` under ``settings.model_cache``.

    A cached copy is re-hashed on every call and replaced from the database when it differs; the bytes
    from the database are hashed before they are put in place, so a corrupted row raises
    :class:`ModelIntegrityError` and never reaches Keras.
    """
    cache = settings.model_cache.resolve()
    folder = cache / check_identifier(record.name, "name") / check_identifier(record.version, "version")
    model_path = folder / MODEL_FILE
    if model_path.is_file() and file_sha256(model_path) == record.sha256:
        return model_path
    with _session(settings) as session:
        row = session.execute(select(ModelVersion.artifact, ModelVersion.metadata_json)
                              .where(ModelVersion.id == record.id)).one_or_none()
    artifact, metadata = row if row is not None else (None, None)
    if artifact is None:
        raise ModelError(f"model {record.name} {record.version} has no artifact bytes in the database",
                         reason=Reason.ARTIFACT_MISSING)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{MODEL_FILE}.{os.getpid()}.partial"
    partial.write_bytes(artifact)
    try:
        verify_sha256(partial, record.sha256)
    except ModelIntegrityError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(model_path)
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return model_path


def load_registered_model(settings: Settings, record: ModelVersion) -> keras.Model:
    """``record``'s model, loaded in Keras safe mode from the verified local copy :func:`fetch_artifact` makes.

    The copy is hashed once, by the fetch; raises as :func:`fetch_artifact` and
    :func:`~model_store.artifact.load_model_file` do.
    """
    return load_model_file(fetch_artifact(settings, record))


def export(settings: Settings, record: ModelVersion, out_dir: Path) -> Path:
    """Write ``record`` as an artifact folder (``model.keras`` + ``metadata.json``) that ``import`` accepts."""
    out_dir = Path(out_dir)
    if (out_dir / MODEL_FILE).exists():
        raise ModelError(f"{out_dir} already holds a {MODEL_FILE}", reason=Reason.ARTIFACT_EXISTS)
    cached = fetch_artifact(settings, record)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out_dir / MODEL_FILE)
    verify_sha256(out_dir / MODEL_FILE, record.sha256)
    (out_dir / METADATA_FILE).write_text(json.dumps(record.metadata_json, indent=2) + "\n")
    return out_dir


def summary(record: ModelVersion) -> dict[str, Any]:
    """The row as shown by ``models list``: identity, state, and the test figures from its metadata."""
    metadata = record.metadata_json or {}
    test = (metadata.get("metrics") or {}).get("test") or {}
    return {
        "name": record.name,
        "version": record.version,
        "active": bool(record.active),
        "created_at": record.created_at.isoformat() if record.created_at else None,
        "activated_at": record.activated_at.isoformat() if record.activated_at else None,
        "activated_by": record.activated_by,
        "threshold": serving_threshold(record),
        "threshold_override": record.threshold_override,
        "threshold_set_at": record.threshold_set_at.isoformat() if record.threshold_set_at else None,
        "threshold_set_by": record.threshold_set_by,
        "degenerate": bool(degenerate_reasons(record)),
        "sha256": record.sha256,
        "base_weights": (metadata.get("base_weights") or {}).get("source"),
        "preprocessing_version": metadata.get("preprocessing_version"),
        "test_accuracy": (test.get("accuracy") or {}).get("value"),
        "test_auc": (test.get("roc_auc") or {}).get("value"),
        "test_n": test.get("n"),
    }
