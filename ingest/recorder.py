"""Records each inbox file in the database: study, instance, quality checks and normalized image in one transaction.

Identity rules (the database is the source of truth):

* A primary instance is the first row for a SOPInstanceUID (``duplicate_of_id`` null).
* The same SOPInstanceUID with the same sha256 as any earlier row -> state ``duplicate``,
  ``duplicate_of_id`` = the primary; no normalized image, never queued.
* The same SOPInstanceUID with different content -> a *conflict*: state ``rejected``, reason
  ``sop_instance_conflict`` (unless the reader rejected the file for its own reason first),
  ``conflict`` true, ``duplicate_of_id`` = the primary; the file goes to quarantine, so both
  versions are kept (the first one in the archive) and an operator decides.
* Only an accepted row can be primary: a copy the reader rejected (a file still being written
  when it was read, ``truncated``) never blocks the complete copy that is dropped later.
* The same physical file is never recorded twice: the row, including where the file is
  about to go (``stored_path``), is committed *before* the file leaves the inbox, and
  :func:`find_recorded_file` recognises a file whose name and sha256 already have a row
  that still points at it (kept in the inbox, or a crash between commit and move).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import Instance, InstanceState, NormalizedImage, QualityCheckRecord, Study
from db.session import create_engine_for, session_scope
from db.upsert import insert_or_ignore
from ingest.inbox import Disposal, plan_disposal
from ingest.normalized_png import encode_png

if TYPE_CHECKING:
    from ingest.reader import AcceptedResult, ReadResult


# The recorder's queries, built once: each file runs them, and building a statement costs more than running it.
_RECORDED_FILE = (select(Instance.id, Instance.stored_path)
                  .where(Instance.file_sha256 == bindparam("sha256"), Instance.file_name == bindparam("file_name"))
                  .order_by(Instance.id.desc()))
_SAME_SOP_INSTANCE = (select(Instance.id, Instance.duplicate_of_id, Instance.file_sha256, Instance.state)
                      .where(Instance.sop_instance_uid == bindparam("uid")).order_by(Instance.id))
_STUDY_ID = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
_INSTANCES, _CHECKS, _IMAGES = (cast(Table, model.__table__)
                                for model in (Instance, QualityCheckRecord, NormalizedImage))
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
_ANY_QUEUED = select(Instance.id).where(Instance.state == InstanceState.queued).limit(1)


@dataclass(frozen=True)
class Outcome:
    """What :func:`record` decided for one file (already committed)."""

    instance_id: int
    state: InstanceState
    reason: Reason | None
    message: str | None
    disposal: Disposal
    duplicate_of_id: int | None = None
    conflict: bool = False
    sop_instance_uid: str | None = None

    @property
    def enqueue(self) -> bool:
        """True when the instance waits for a prediction (a new, accepted image)."""
        return self.state is InstanceState.received

    def reason_record(self, rel_name: str, sha256: str) -> dict[str, Any]:
        """The content of ``<file>.reason.json`` when the file is quarantined."""
        return {
            "reason": self.reason,
            "message": self.message,
            "instance_id": self.instance_id,
            "file_name": rel_name,
            "sha256": sha256,
            "sop_instance_uid": self.sop_instance_uid,
            "duplicate_of_id": self.duplicate_of_id,
            "conflict": self.conflict,
            "recorded_at": _utcnow().isoformat(),
        }


def find_recorded_file(settings: Settings, path: Path, rel_name: str, sha256: str) -> Instance | None:
    """The row that already accounts for *this physical file*, or ``None`` if the file is a new drop.

    A row with the same inbox name and sha256 accounts for the file when its ``stored_path``
    is the file itself (kept, or deletion pending), names a place the file never reached (a
    crash between commit and move), or is another name of the same inode (a crash between
    the hard link and the unlink of a move). A row whose file really is elsewhere, or was
    deleted, means the file was dropped again: a new instance (a duplicate).
    """
    with session_scope(settings) as session:
        return _recorded_file(session, path, rel_name, sha256)


def _recorded_file(session: Session, path: Path, rel_name: str, sha256: str) -> Instance | None:
    rows = session.execute(_RECORDED_FILE, {"sha256": sha256, "file_name": rel_name}).all()
    if not rows:  # a new drop, the usual case: nothing to resolve
        return None
    here = path.resolve()
    for instance_id, stored_path in rows:
        if stored_path is None:
            continue
        stored = Path(stored_path)
        if stored == here or not stored.exists() or _same_file(stored, here):
            return session.get(Instance, instance_id)
    return None


@dataclass(frozen=True)
class RecordedBefore:
    """:func:`record_group`'s answer for a file that a row already accounts for: nothing was recorded."""

    instance: Instance


@dataclass(frozen=True)
class FileToRecord:
    """One read file for :func:`record_group`: where it was dropped, its inbox name, size and reader's result."""

    path: Path
    rel_name: str
    file_size: int
    result: ReadResult
    #: Where the file is now, when it may have been recorded before (a restart meeting its own file): then it is
    #: recognised (:func:`find_recorded_file`) instead of recorded again. ``None``: asked already, or not to ask.
    recognise_at: Path | None = None


def record(settings: Settings, *, path: Path, rel_name: str, file_size: int, result: ReadResult) -> Outcome:
    """Commit the rows for one read file and the planned disposal; returns the outcome.

    Retries once when a concurrent ingester committed the same SOPInstanceUID first (the
    partial unique index on primary rows makes the second one a duplicate or conflict).
    """
    outcome = _record_alone(settings, FileToRecord(path, rel_name, file_size, result))
    assert isinstance(outcome, Outcome)  # nothing is recognised unless asked
    return outcome


def _record_alone(settings: Settings, file: FileToRecord) -> Outcome | RecordedBefore:
    for attempt in (1, 2):
        try:
            with session_scope(settings) as session:
                return _record(session, settings, file)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def record_group(settings: Settings, files: Sequence[FileToRecord]) -> list[Outcome | RecordedBefore | Exception]:
    """Commit the rows of several read files in one transaction, in order; an outcome or an error for each.

    One commit (one fsync of the database's log) for the group instead of one per file: the
    ingest loop hands over every file decoded while the previous group was being written. The
    rules are :func:`record`'s, applied file after file; a later file of the group sees the
    earlier ones (the same SOPInstanceUID twice in one group is a duplicate, as it would be one
    commit apart). If the group fails as a whole (a concurrent ingester won a SOPInstanceUID,
    one file's rows cannot be written), nothing of it is committed and each file is recorded on
    its own, so that one file's error is that file's alone. A file with ``recognise_at`` that a row
    already accounts for is answered :class:`RecordedBefore`, with nothing recorded.
    """
    if len(files) > 1:
        try:
            with session_scope(settings) as session:
                return [_record(session, settings, file) for file in files]
        except Exception:  # one by one below: the errors, if any, land on the files that cause them
            pass
    outcomes: list[Outcome | RecordedBefore | Exception] = []
    for file in files:
        try:
            outcomes.append(_record_alone(settings, file))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def _record(session: Session, settings: Settings, file: FileToRecord) -> Outcome | RecordedBefore:
    path, rel_name, file_size, result = file.path, file.rel_name, file.file_size, file.result
    metadata = result.metadata
    fields = metadata.to_dict() if metadata is not None else {}
    sop_instance_uid = fields.get("sop_instance_uid")
    rejection = None if result.accepted else result.rejection

    primary_id, same_content = _earlier_instances(session, sop_instance_uid, result.sha256)
    # Only a file whose content has a row can be accounted for already: a new drop (the usual case) is not asked.
    if file.recognise_at is not None and (same_content or not sop_instance_uid):
        known = _recorded_file(session, file.recognise_at, rel_name, result.sha256)
        if known is not None:
            return RecordedBefore(known)
    now = _utcnow()
    reason = message = None
    conflict = False
    if primary_id is None:
        if rejection is None:
            state = InstanceState.received
        else:
            state, reason, message = InstanceState.rejected, rejection.reason, rejection.message
    elif same_content:
        state, reason = InstanceState.duplicate, Reason.DUPLICATE_INSTANCE
        message = f"identical copy (same SOPInstanceUID and sha256) of instance {primary_id}"
    else:
        conflict = True
        state = InstanceState.rejected
        if rejection is None:
            reason = Reason.SOP_INSTANCE_CONFLICT
            message = (f"SOPInstanceUID {sop_instance_uid} was already recorded (instance {primary_id}) with "
                       "different content; both files are kept, this one in quarantine")
        else:
            reason, message = rejection.reason, rejection.message
    # A conflicting version is quarantined even when readable: which version is right is an operator's call.
    disposal = plan_disposal(settings, path, rel_name, accepted=result.accepted and not conflict)

    instance = dict(
        state=state,
        reason=reason,
        message=message,
        attempts=0,
        file_name=rel_name,
        file_sha256=result.sha256,
        file_size=file_size,
        stored_path=str(disposal.destination),
        study_instance_uid=fields.get("study_instance_uid"),
        series_instance_uid=fields.get("series_instance_uid"),
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=fields.get("sop_class_uid"),
        modality=fields.get("modality"),
        view_position=fields.get("view_position"),
        body_part_examined=fields.get("body_part_examined"),
        manufacturer=fields.get("manufacturer"),
        institution_name=fields.get("institution_name"),
        patient_sex=fields.get("patient_sex"),
        age_band=fields.get("age_band"),
        rows=fields.get("rows"),
        columns=fields.get("columns"),
        photometric_interpretation=fields.get("photometric_interpretation"),
        transfer_syntax_uid=fields.get("transfer_syntax_uid"),
        bits_stored=fields.get("bits_stored"),
        flags=list(result.flags) or None,
        duplicate_of_id=primary_id,
        conflict=conflict,
        created_at=now,
        updated_at=now,
        finished_at=None if state is InstanceState.received else now,
        study_id=_study_id(session, fields) if result.accepted and not conflict and fields.get("study_instance_uid")
        else None,
    )
    # Plain INSERTs into the tables (no unit of work, no ORM bulk path): the ORM's flush of one new object cost
    # about as much as the rest of a file.
    connection = session.connection()
    instance_id: int = connection.execute(_INSERT_INSTANCE, instance).scalar_one()
    if state is not InstanceState.duplicate and result.quality:  # a copy's checks are its primary's
        connection.execute(insert(_CHECKS), [
            {"instance_id": instance_id, "check_name": check.check, "decision": check.decision,
             "finding": check.finding, "score": check.score, "confident": check.confident, "action": check.action,
             "evidence": check.evidence, "version": check.version, "created_at": now} for check in result.quality])
    if result.accepted and state is InstanceState.received:  # a new instance: the worker's input
        connection.execute(insert(_IMAGES), [_normalized_image(instance_id, result)])
    return Outcome(instance_id, state, reason, message, disposal, primary_id, conflict, sop_instance_uid)


def _earlier_instances(session: Session, sop_instance_uid: str | None, sha256: str) -> tuple[int | None, bool]:
    """(the row a new one points at, whether any earlier row with this SOPInstanceUID has this sha256).

    The row pointed at is the primary (as PRIMARY_ROW_PREDICATE: an accepted row) if there is one.
    Without one, an identical copy still points at the first row of its SOPInstanceUID (a duplicate
    of a rejected file), while different content starts afresh: a copy the reader rejected (cut
    short, say) never blocks a complete one.
    """
    if not sop_instance_uid:
        return None, False
    rows = session.execute(_SAME_SOP_INSTANCE, {"uid": sop_instance_uid}).all()
    same_content = any(row.file_sha256 == sha256 for row in rows)
    originals = [row for row in rows if row.duplicate_of_id is None]
    primary = next((row.id for row in originals if row.state != InstanceState.rejected), None)
    if primary is None and same_content:
        primary = originals[0].id if originals else None
    return primary, same_content


def _study_id(session: Session, fields: dict[str, Any]) -> int:
    uid = fields["study_instance_uid"]
    study_id = session.scalar(_STUDY_ID, {"uid": uid})
    if study_id is not None:
        return study_id
    # Another ingester may be creating the same study: the first insert wins and the other one is ignored (on
    # PostgreSQL it waits for the first to commit), then both read the one row; no savepoint round trips.
    insert_or_ignore(session, Study, [{"study_instance_uid": uid, "accession_number": fields.get("accession_number"),
                                      "study_date": fields.get("study_date"),
                                      "patient_pseudonym": fields.get("patient_pseudonym"), "created_at": _utcnow()}],
                     key=["study_instance_uid"])
    return session.execute(_STUDY_ID, {"uid": uid}).scalar_one()


def _normalized_image(instance_id: int, result: AcceptedResult) -> dict[str, Any]:
    from ingest.pixels import PREPROCESSING_VERSION

    image = result.image
    # A decode process encodes the PNG beside decoding (that work scales with the processes); else it is done here.
    png = result.png if result.png is not None else encode_png(image)
    return {"instance_id": instance_id, "preprocessing_version": PREPROCESSING_VERSION, "png": png,
            "mean": float(image.mean()), "std": float(image.std())}


def set_stored_path(settings: Settings, instance_id: int, stored_path: Path | None) -> None:
    """Record where the file of ``instance_id`` ended up (``None``: deleted)."""
    with session_scope(settings) as session:
        session.execute(update(Instance).where(Instance.id == instance_id)
                        .values(stored_path=None if stored_path is None else str(stored_path), updated_at=_utcnow()))


def any_queued(settings: Settings) -> bool:
    """Whether some instance is ``queued``: sent in a batch that no worker has finished (one indexed probe)."""
    with create_engine_for(settings).connect() as connection:
        return connection.execute(_ANY_QUEUED).first() is not None


def counts_by_state(settings: Settings) -> dict[str, int]:
    """Number of instances in each state (every state present, zero included)."""
    with session_scope(settings) as session:
        rows = session.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
    counts: dict[str, int] = {state: 0 for state in InstanceState}
    counts.update({state: n for state, n in rows})
    return counts


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _utcnow() -> datetime:
    return datetime.now(UTC)
