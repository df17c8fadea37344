"""The evaluation window and the SQL that gathers its cases, with ground truth resolved by :mod:`db.views`.

Reading through the analysts' views means a nightly report and an analyst's query agree on which
label each prediction is scored against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Row, Table, func, select
from sqlalchemy.orm import Session

from covid_cxr.constants import EVALUATION_WINDOWS
from covid_cxr.errors import DatasetError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import Instance, InstanceState, ModelVersion, QualityCheckRecord
from db.views import image_results, study_results
from worker.evaluation_metrics import Cases

#: Window names and their length; ``all`` has no start.
WINDOWS: dict[str, timedelta | None] = dict(zip(
    EVALUATION_WINDOWS, (timedelta(hours=24), timedelta(days=7), timedelta(days=30), None), strict=True))


@dataclass(frozen=True)
class Window:
    """A time window ``[start, end)`` in UTC; ``period`` (the end's UTC date) identifies its report."""

    name: str
    start: datetime | None
    end: datetime

    @property
    def period(self) -> str:
        return self.end.date().isoformat()

    def describe(self) -> str:
        start = "the beginning" if self.start is None else f"{self.start:%Y-%m-%d %H:%M}"
        return f"{self.name}: {start} to {self.end:%Y-%m-%d %H:%M} UTC"


def resolve_window(name: str, now: datetime | None = None) -> Window:
    """The window ``name`` ending at ``now`` (default: the current time)."""
    if name not in WINDOWS:
        raise DatasetError(f"unknown window {name!r}: use one of {', '.join(WINDOWS)}", reason=Reason.UNKNOWN_WINDOW)
    end = (now or datetime.now(UTC)).astimezone(UTC)
    length = WINDOWS[name]
    return Window(name, None if length is None else end - length, end)


def _in_window(column: Any, window: Window) -> list[Any]:
    # Bounds are aware UTC datetimes: PostgreSQL compares them as instants whatever the session's
    # time zone, and SQLite's DateTime type writes them as the naive UTC text the ORM stores.
    conditions = [column < window.end]
    if window.start is not None:
        conditions.append(column >= window.start)
    return conditions


def model_versions_in_window(session: Session, window: Window) -> list[str]:
    """Model versions with at least one prediction in the window."""
    query = select(image_results.c.model_version).where(*_in_window(image_results.c.predicted_at, window)).distinct()
    return sorted(session.scalars(query))


#: The DICOM attributes of the image-level report's subgroup tables (columns of ``v_image_results``).
IMAGE_SUBGROUP_ATTRIBUTES: tuple[str, ...] = ("manufacturer", "modality", "view_position")
#: Further subgroup attributes read from the ``instances`` table (sex and age band only, nothing identifying).
INSTANCE_SUBGROUP_ATTRIBUTES: tuple[str, ...] = ("institution_name", "patient_sex", "age_band")


def model_record(session: Session, settings: Settings, version: str) -> ModelVersion | None:
    """The registry's record of ``version``, preferring the installation's model name; ``None`` if unregistered."""
    records = session.scalars(select(ModelVersion).where(ModelVersion.version == version)).all()
    preferred = [r for r in records if r.name == settings.model_name]
    return next(iter(preferred or records), None)


def _threshold(thresholds: list[float], record: ModelVersion | None) -> float:
    distinct = sorted(set(thresholds))
    if len(distinct) == 1:
        return distinct[0]
    metadata = record.metadata_json if record is not None else {}
    return float(metadata.get("decision_threshold", 0.5))


def _case_rows(session: Session, view: Table, version: str, window: Window, *, time_column: str,
               order_column: str, extra: tuple[str, ...] = (), include_flagged: bool = False) -> Sequence[Row[Any]]:
    """The rows of ``version`` in the window from an analyst view, with the columns every case needs.

    Rows a quality check flagged (``quality_flagged``) are left out unless ``include_flagged``.
    """
    columns = [view.c[name] for name in ("prob_covid", "predicted_label", "true_label", "label_status", *extra)]
    flagged = [] if include_flagged else [view.c.quality_flagged == 0]
    return session.execute(
        select(*columns)
        .where(view.c.model_version == version, *_in_window(view.c[time_column], window), *flagged)
        .order_by(view.c[order_column])
    ).all()


def flagged_cases(session: Session, window: Window, version: str) -> dict[str, int]:
    """How many image predictions and study results of ``version`` in the window a quality check flagged."""
    counts = {}
    for level, view, time_column in (("image", image_results, "predicted_at"), ("study", study_results, "updated_at")):
        counts[level] = session.scalar(
            select(func.count()).select_from(view)
            .where(view.c.model_version == version, view.c.quality_flagged == 1,
                   *_in_window(view.c[time_column], window))) or 0
    return counts


def _cases(rows: Sequence[Row[Any]], threshold: float, image_mean: np.ndarray | None = None,
           image_std: np.ndarray | None = None) -> Cases:
    return Cases(
        prob_covid=np.array([r.prob_covid for r in rows], dtype=float),
        predicted_label=[r.predicted_label for r in rows],
        true_label=[r.true_label for r in rows],
        label_status=[r.label_status for r in rows],
        threshold=threshold,
        image_mean=np.empty(0) if image_mean is None else image_mean,
        image_std=np.empty(0) if image_std is None else image_std,
    )


def image_cases(session: Session, window: Window, version: str, record: ModelVersion | None, *,
                include_flagged: bool = False) -> Cases:
    """Every image prediction of ``version`` in the window (flagged ones only if ``include_flagged``), with its
    resolved label and pixel statistics."""
    rows = _case_rows(session, image_results, version, window, time_column="predicted_at",
                      order_column="prediction_id", extra=("threshold", "image_mean", "image_std",
                                                           "instance_id", *IMAGE_SUBGROUP_ATTRIBUTES),
                      include_flagged=include_flagged)
    cases = _cases(rows, _threshold([r.threshold for r in rows], record),
                   image_mean=np.array([r.image_mean for r in rows if r.image_mean is not None], dtype=float),
                   image_std=np.array([r.image_std for r in rows if r.image_std is not None], dtype=float))
    cases.attributes = {name: [getattr(r, name) for r in rows] for name in IMAGE_SUBGROUP_ATTRIBUTES}
    stored = {row.id: row for row in session.execute(
        select(Instance.id, *(getattr(Instance, name) for name in INSTANCE_SUBGROUP_ATTRIBUTES))
        .where(Instance.id.in_({r.instance_id for r in rows})))} if rows else {}
    for name in INSTANCE_SUBGROUP_ATTRIBUTES:
        cases.attributes[name] = [getattr(stored[r.instance_id], name) if r.instance_id in stored else None
                                  for r in rows]
    return cases


def study_cases(session: Session, window: Window, version: str, threshold: float, *,
                include_flagged: bool = False) -> Cases:
    """Every study result of ``version`` updated in the window, judged at the image level's ``threshold``; a study
    with a flagged image only if ``include_flagged``."""
    rows = _case_rows(session, study_results, version, window, time_column="updated_at",
                      order_column="study_result_id", include_flagged=include_flagged)
    return _cases(rows, threshold)


def reject_counts(session: Session, window: Window) -> dict[str, Any]:
    """Files received in the window by final state, and rejected/failed ones by reason code."""
    by_state = dict(session.execute(
        select(Instance.state, func.count()).where(*_in_window(Instance.created_at, window)).group_by(Instance.state)
    ).all())
    by_reason: dict[str, dict[str, int]] = {}
    for state, reason, count in session.execute(
        select(Instance.state, Instance.reason, func.count())
        .where(Instance.state.in_([InstanceState.rejected, InstanceState.failed]),
               *_in_window(Instance.created_at, window))
        .group_by(Instance.state, Instance.reason)
    ):
        by_reason.setdefault(state, {})[reason or "unspecified"] = count
    return {"files": sum(by_state.values()), "by_state": by_state, "by_reason": by_reason}


def quality_counts(session: Session, window: Window) -> dict[str, dict[str, int]]:
    """Quality-check outcomes of the files received in the window: ``{check: {decision: count}}``."""
    counts: dict[str, dict[str, int]] = {}
    for check, decision, count in session.execute(
        select(QualityCheckRecord.check_name, QualityCheckRecord.decision, func.count())
        .join(Instance, Instance.id == QualityCheckRecord.instance_id)
        .where(*_in_window(Instance.created_at, window))
        .group_by(QualityCheckRecord.check_name, QualityCheckRecord.decision)
        .order_by(QualityCheckRecord.check_name, QualityCheckRecord.decision)
    ):
        counts.setdefault(check, {})[decision] = count
    return counts
