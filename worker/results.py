"""Read-only queries behind ``covid-cxr status`` and ``covid-cxr results``: counts, queue depths, recent results."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import Instance, InstanceState, ModelVersion, Prediction, QualityCheckRecord, Study, StudyResult
from db.session import session_scope
from delivery.outbox import outbox_summary
from ingest.stuck import stuck_files
from ingest.watermark import ingest_status
from taskqueue.recovery import overdue_summary

#: Column order of image rows (``results`` table and CSV).
IMAGE_COLUMNS = (
    "instance_id", "created_at", "state", "reason", "study_instance_uid", "sop_instance_uid", "modality",
    "view_position", "prob_covid", "label", "threshold", "model_version", "study_prob_covid", "study_label",
    "inference_ms", "queued_ms", "file_name", "flags",
)
#: Column order of study rows.
STUDY_COLUMNS = (
    "study_instance_uid", "accession_number", "study_date", "model_version", "n_images", "prob_covid", "label",
    "rule", "updated_at",
)


def status_report(settings: Settings) -> dict[str, Any]:
    """Everything ``covid-cxr status`` shows, as plain JSON-serializable data."""
    with session_scope(settings) as session:
        report: dict[str, Any] = {
            "database": maybe_sanitize_url(settings.database),
            "broker": (f"filesystem:// (folder {settings.broker_dir})" if settings.embedded_broker
                       else maybe_sanitize_url(settings.broker)),
            "instances": state_counts(session),
            "predictions": session.scalar(select(func.count()).select_from(Prediction)) or 0,
            "studies": session.scalar(select(func.count()).select_from(Study)) or 0,
            "active_model": active_model(session, settings.model_name),
            "last_error": last_error(session),
            "last_rejection": last_rejection(session),
            "oldest_pending": oldest_pending(session),
            "quality": quality_counts(session),
            "outbox": outbox_summary(session, count_unreported=bool(settings.dicom_destinations)),
            # Per ingester: paused below the free-disk watermark? Stale rows are ingesters not seen lately.
            "ingest": ingest_status(session, fresh_seconds=3 * settings.reconcile_interval_seconds + 30),
        }
    report["overdue"] = overdue_summary(settings)
    report["queues"], report["queue_error"] = queue_depths(settings)
    report["stuck_files"] = stuck_files(settings)
    return report


def state_counts(session: Session) -> dict[str, int]:
    """Instances per state, every state present (0 when none), plus ``total``."""
    counts: dict[str, int] = {state: 0 for state in InstanceState}
    for state, count in session.execute(select(Instance.state, func.count()).group_by(Instance.state)):
        counts[state] = count
    counts["total"] = sum(counts.values())
    return counts


def quality_counts(session: Session) -> dict[str, dict[str, int]]:
    """Quality-check outcomes: ``{check: {decision: count}}`` over every recorded file."""
    counts: dict[str, dict[str, int]] = {}
    for check, decision, count in session.execute(
        select(QualityCheckRecord.check_name, QualityCheckRecord.decision, func.count())
        .group_by(QualityCheckRecord.check_name, QualityCheckRecord.decision)
        .order_by(QualityCheckRecord.check_name, QualityCheckRecord.decision)
    ):
        counts.setdefault(check, {})[decision] = count
    return counts


def active_model(session: Session, name: str) -> dict[str, Any] | None:
    record = session.scalars(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.active)).first()
    if record is None:
        return None
    metadata = record.metadata_json or {}
    return {
        "name": record.name,
        "version": record.version,
        "sha256": record.sha256,
        "decision_threshold": metadata.get("decision_threshold"),
        "preprocessing_version": metadata.get("preprocessing_version"),
        "imported_at": _iso(record.imported_at),
    }


def last_error(session: Session) -> dict[str, Any] | None:
    """The latest failure: an instance that ended ``failed``, or one whose last attempt failed and is being retried."""
    row = session.scalars(
        select(Instance)
        .where(Instance.reason.is_not(None),
               Instance.state.in_([InstanceState.failed, InstanceState.queued, InstanceState.received]))
        .order_by(Instance.updated_at.desc(), Instance.id.desc())
        .limit(1)
    ).first()
    return _problem(row)


def last_rejection(session: Session) -> dict[str, Any] | None:
    row = session.scalars(
        select(Instance).where(Instance.state == InstanceState.rejected)
        .order_by(Instance.updated_at.desc(), Instance.id.desc()).limit(1)
    ).first()
    return _problem(row)


def oldest_pending(session: Session) -> dict[str, Any] | None:
    """The oldest instance still waiting for a prediction (``received`` or ``queued``) and its age."""
    row = session.scalars(
        select(Instance)
        .where(Instance.state.in_([InstanceState.received, InstanceState.queued]))
        .order_by(Instance.created_at, Instance.id).limit(1)
    ).first()
    if row is None:
        return None
    age = (datetime.now(UTC) - _aware(row.created_at)).total_seconds()
    return {"instance_id": row.id, "state": row.state, "attempts": row.attempts, "age_seconds": round(age, 1)}


def queue_depths(settings: Settings) -> tuple[dict[str, int], str | None]:
    """Messages waiting in each queue (Redis: list lengths; filesystem broker: message files).

    Messages a worker has taken but not yet acknowledged are not counted. Returns
    ``({}, error)`` when the broker cannot be reached.
    """
    from kombu.exceptions import ChannelError

    from taskqueue.producer import producer_app

    depths: dict[str, int] = {}
    try:
        with producer_app(settings).connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5)
            channel = connection.default_channel
            for queue in dict.fromkeys([settings.inference_queue, settings.cpu_queue]):
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except ChannelError:  # never declared: nothing was ever sent to it
                    depths[queue] = 0
    except Exception as exc:  # any transport error means "unknown", which status reports as such
        return {}, f"broker unreachable: {type(exc).__name__}: {exc}"
    return depths, None


def recent_results(settings: Settings, limit: int = 20,
                   study_uid: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The ``limit`` most recent study results and image rows (newest first), optionally of one study.

    An image row is an instance in any state with its latest prediction (if any) and that
    model's study result; patient pseudonyms are never included.
    """
    with session_scope(settings) as session:
        return {
            "studies": _recent_studies(session, limit, study_uid),
            "images": _recent_images(session, limit, study_uid),
        }


def _recent_studies(session: Session, limit: int, study_uid: str | None) -> list[dict[str, Any]]:
    query = (
        select(Study.study_instance_uid, Study.accession_number, Study.study_date, StudyResult.model_version,
               StudyResult.n_images, StudyResult.prob_covid, StudyResult.label, StudyResult.rule,
               StudyResult.updated_at)
        .join(StudyResult, StudyResult.study_id == Study.id)
        .order_by(StudyResult.updated_at.desc(), StudyResult.id.desc())
        .limit(limit)
    )
    if study_uid:
        query = query.where(Study.study_instance_uid == study_uid)
    return [_jsonable(row._asdict()) for row in session.execute(query)]


def _recent_images(session: Session, limit: int, study_uid: str | None) -> list[dict[str, Any]]:
    latest = (
        select(Prediction.instance_id, func.max(Prediction.id).label("prediction_id"))
        .group_by(Prediction.instance_id)
        .subquery()
    )
    query = (
        select(Instance.id.label("instance_id"), Instance.created_at, Instance.state, Instance.reason,
               Instance.study_instance_uid, Instance.sop_instance_uid, Instance.modality, Instance.view_position,
               Prediction.prob_covid, Prediction.label, Prediction.threshold, Prediction.model_version,
               StudyResult.prob_covid.label("study_prob_covid"), StudyResult.label.label("study_label"),
               Prediction.inference_ms, Prediction.queued_ms, Instance.file_name, Instance.flags)
        .outerjoin(latest, latest.c.instance_id == Instance.id)
        .outerjoin(Prediction, Prediction.id == latest.c.prediction_id)
        .outerjoin(StudyResult, (StudyResult.study_id == Instance.study_id)
                   & (StudyResult.model_version == Prediction.model_version))
        .order_by(Instance.created_at.desc(), Instance.id.desc())
        .limit(limit)
    )
    if study_uid:
        query = query.where(Instance.study_instance_uid == study_uid)
    return [_jsonable(row._asdict()) for row in session.execute(query)]


def _problem(row: Instance | None) -> dict[str, Any] | None:
    """An instance's problem; ``reason_description`` is ``None`` for a code this release does not know."""
    if row is None:
        return None
    reason = Reason.lookup(row.reason)
    return {
        "instance_id": row.id,
        "state": row.state,
        "reason": row.reason,
        "reason_description": None if reason is None else reason.description,
        "message": row.message,
        "attempts": row.attempts,
        "at": _iso(row.finished_at or row.updated_at),
        "file_name": row.file_name,
    }


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {key: _iso(value) if isinstance(value, datetime) else value for key, value in values.items()}


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else _aware(moment).isoformat()
