"""Read-only queries of the dashboard and the installation's gauges that ``status`` and ``results`` do not have."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from covid_cxr.constants import EVALUATION_WINDOWS
from db.models import EvaluationReport, Instance, InstanceState, ModelVersion, NormalizedImage, Prediction, StuckFile

#: The order windows are shown in: the nightly one first.
WINDOW_ORDER = EVALUATION_WINDOWS


@dataclass(frozen=True)
class DiskSpace:
    """Free and total bytes of the file system that holds ``path``."""

    path: str
    free_bytes: int
    total_bytes: int

    @property
    def free_fraction(self) -> float:
        return self.free_bytes / self.total_bytes if self.total_bytes else 0.0


def disk_space(path: Path) -> DiskSpace | None:
    """The data dir's file system, or ``None`` where this machine has no such folder (a web server elsewhere)."""
    resolved = path.expanduser().resolve()
    try:
        usage = shutil.disk_usage(resolved)
    except OSError:
        return None
    return DiskSpace(str(resolved), usage.free, usage.total)


def counts_by_state_and_reason(session: Session) -> list[tuple[str, str | None, int]]:
    """``(state, reason, instances)`` for every combination present."""
    rows = session.execute(select(Instance.state, Instance.reason, func.count())
                           .group_by(Instance.state, Instance.reason)
                           .order_by(Instance.state, Instance.reason))
    return [(state, reason, count) for state, reason, count in rows]


def stuck_entry_count(session: Session) -> int:
    """Inbox entries on the stuck list (``covid-cxr status`` lists them with their cause)."""
    return session.scalar(select(func.count()).select_from(StuckFile)) or 0


def per_minute(session: Session, column: Any, now: datetime, minutes: int = 60) -> list[int]:
    """How many rows ``column`` (a creation time) puts in each of the last ``minutes`` minutes, oldest first."""
    start = now - timedelta(minutes=minutes)
    counts = [0] * minutes
    for (moment,) in session.execute(select(column).where(column >= start)):
        index = int((_aware(moment) - start).total_seconds() // 60)
        if 0 <= index < minutes:
            counts[index] += 1
    return counts


def throughput(session: Session, now: datetime, minutes: int = 60) -> dict[str, list[int]]:
    """Files recorded and predictions written per minute over the last ``minutes`` minutes."""
    return {"files": per_minute(session, Instance.created_at, now, minutes),
            "predictions": per_minute(session, Prediction.created_at, now, minutes)}


def recent_rejections(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The latest rejected files, newest first, with what the header said and which model views are stored.

    A rejected file has a stored view only where the reader normalized it; a conflicting file
    (``sop_instance_conflict``) has none, but the version it conflicts with has, which is what an
    operator compares it with.
    """
    primary_image = aliased(NormalizedImage)
    has_image = NormalizedImage.instance_id.is_not(None).label("has_image")
    primary_has_image = primary_image.instance_id.is_not(None).label("primary_has_image")
    rows = session.execute(
        select(Instance.id.label("instance_id"), Instance.created_at, Instance.file_name, Instance.reason,
               Instance.message, Instance.conflict, Instance.duplicate_of_id, Instance.modality,
               Instance.body_part_examined, Instance.view_position, Instance.rows, Instance.columns,
               Instance.transfer_syntax_uid, has_image, primary_has_image)
        .outerjoin(NormalizedImage, NormalizedImage.instance_id == Instance.id)
        .outerjoin(primary_image, primary_image.instance_id == Instance.duplicate_of_id)
        .where(Instance.state == InstanceState.rejected.value)
        .order_by(Instance.created_at.desc(), Instance.id.desc())
        .limit(limit))
    return [{**row._asdict(), "created_at": _iso(row.created_at)} for row in rows]


def normalized_png(session: Session, instance_id: int) -> bytes | None:
    """The stored 224x224 model input of one instance, PNG-encoded, or ``None``."""
    return session.scalar(select(NormalizedImage.png).where(NormalizedImage.instance_id == instance_id))


def scoring_version(session: Session, instance_id: int) -> tuple[int | None, str] | None:
    """``(model id, model version)`` of the instance's latest prediction (the one the results page shows), or
    ``None`` when no model scored it."""
    row = session.execute(select(Prediction.model_id, Prediction.model_version)
                          .where(Prediction.instance_id == instance_id)
                          .order_by(Prediction.id.desc()).limit(1)).first()
    return None if row is None else (row.model_id, row.model_version)


def registered_version(session: Session, model_id: int | None, version: str, name: str) -> ModelVersion | None:
    """The registry row of a prediction's model: by its id, else (a prediction without one) by its version, of
    ``name`` when several names have that version; ``None`` when it is no longer registered."""
    if model_id is not None:
        return session.get(ModelVersion, model_id)
    return session.scalar(select(ModelVersion).where(ModelVersion.version == version)
                          .order_by((ModelVersion.name == name).desc(), ModelVersion.id).limit(1))


def evaluation_reports(session: Session, limit: int = 60) -> list[EvaluationReport]:
    """Stored evaluation reports, newest first (the ``limit`` most recent)."""
    return list(session.scalars(select(EvaluationReport)
                                .order_by(EvaluationReport.created_at.desc(), EvaluationReport.id.desc())
                                .limit(limit)))


def evaluation_report(session: Session, report_id: int) -> EvaluationReport | None:
    return session.get(EvaluationReport, report_id)


def latest_report_ages(session: Session, now: datetime | None = None) -> list[tuple[str, str, str, float]]:
    """``(model_version, level, window, seconds since it was stored)`` of the newest report of each kind."""
    now = now or datetime.now(UTC)
    rows = session.execute(
        select(EvaluationReport.model_version, EvaluationReport.level, EvaluationReport.window,
               func.max(EvaluationReport.created_at))
        .group_by(EvaluationReport.model_version, EvaluationReport.level, EvaluationReport.window))
    return [(version, level, window, (now - _aware(created)).total_seconds())
            for version, level, window, created in rows]


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes; every timestamp this project writes is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else _aware(moment).isoformat()
