"""The evaluation job: predictions of a time window against ground truth, per model version, stored as reports.

For every model version with predictions in the window it writes one ``evaluation_reports`` row per
level (``image``; ``study`` when study results exist), replacing an earlier run of the same window
and day, plus PNG plots and one self-contained HTML page under ``settings.reports``. Every metric
comes from :mod:`model_store.metrics`, drift from :mod:`model_store.drift`; ground truth is resolved
by the SQL views of :mod:`db.views`, so the report and an analyst's query agree.
Never imports TensorFlow: it runs in the CPU worker and in the command-line process.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from celery import shared_task
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from covid_cxr.errors import DatasetError
from covid_cxr.settings import Settings
from db.migrate import check_schema
from db.models import EvaluationReport, Instance, InstanceState, ModelVersion
from db.session import session_scope
from db.views import image_results, study_results
from model_store.drift import QUANTITIES, drift_report
from model_store.metrics import CLASS_NAMES, binary_report
from model_store.report_render import (
    RocCurve,
    plot_confusion_matrix,
    plot_roc,
    plot_score_histogram,
    render_html_page,
    render_window_text,
)
from taskqueue.names import EVALUATE_TASK

log = logging.getLogger(__name__)

#: Window names and their length; ``all`` has no start.
WINDOWS: dict[str, timedelta | None] = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "all": None,
}
LEVELS: tuple[str, ...] = ("image", "study")
POSITIVE = CLASS_NAMES[0]
#: Bootstrap resamples for the F1 and ROC AUC intervals.
BOOTSTRAP_RESAMPLES = 1000
#: Fixed bins of the predicted probability for the score distribution.
SCORE_BIN_EDGES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

#: Flags a report can raise (besides ``drift_<quantity>`` from :func:`model_store.drift.drift_report`).
FLAG_NO_LABELS = "no_labelled_predictions"
FLAG_LABEL_CONFLICTS = "label_conflicts"
FLAG_DECISION_MISMATCH = "decision_mismatch"


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
        raise DatasetError(f"unknown window {name!r}: use one of {', '.join(WINDOWS)}", reason="unknown_window")
    end = (now or datetime.now(UTC)).astimezone(UTC)
    length = WINDOWS[name]
    return Window(name, None if length is None else end - length, end)


@dataclass
class ReportSummary:
    """One stored report, as the job returns and the command line prints it."""

    model_version: str
    level: str
    window: str
    period: str
    n: int
    flags: list[str]
    html_path: str
    accuracy: float | None = None
    roc_auc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Cases:
    """The rows one report is computed from."""

    prob_covid: np.ndarray
    predicted_label: list[str]
    true_label: list[str | None]
    label_status: list[str | None]
    threshold: float
    image_mean: np.ndarray = field(default_factory=lambda: np.empty(0))
    image_std: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def labelled(self) -> np.ndarray:
        return np.array([label is not None for label in self.true_label], dtype=bool)


# --- reading the window -----------------------------------------------------------------------------


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


def _model_record(session: Session, settings: Settings, version: str) -> ModelVersion | None:
    records = session.scalars(select(ModelVersion).where(ModelVersion.version == version)).all()
    preferred = [r for r in records if r.name == settings.model_name]
    return (preferred or records or [None])[0]


def _threshold(thresholds: list[float], record: ModelVersion | None) -> float:
    distinct = sorted(set(thresholds))
    if len(distinct) == 1:
        return distinct[0]
    metadata = record.metadata_json if record is not None else {}
    return float(metadata.get("decision_threshold", 0.5))


def _image_cases(session: Session, window: Window, version: str, record: ModelVersion | None) -> _Cases:
    rows = session.execute(
        select(image_results.c.prob_covid, image_results.c.predicted_label, image_results.c.true_label,
               image_results.c.label_status, image_results.c.threshold, image_results.c.image_mean,
               image_results.c.image_std)
        .where(image_results.c.model_version == version, *_in_window(image_results.c.predicted_at, window))
        .order_by(image_results.c.prediction_id)
    ).all()
    return _Cases(
        prob_covid=np.array([r.prob_covid for r in rows], dtype=float),
        predicted_label=[r.predicted_label for r in rows],
        true_label=[r.true_label for r in rows],
        label_status=[r.label_status for r in rows],
        threshold=_threshold([r.threshold for r in rows], record),
        image_mean=np.array([r.image_mean for r in rows if r.image_mean is not None], dtype=float),
        image_std=np.array([r.image_std for r in rows if r.image_std is not None], dtype=float),
    )


def _study_cases(session: Session, window: Window, version: str, threshold: float) -> _Cases:
    rows = session.execute(
        select(study_results.c.prob_covid, study_results.c.predicted_label, study_results.c.true_label,
               study_results.c.label_status)
        .where(study_results.c.model_version == version, *_in_window(study_results.c.updated_at, window))
        .order_by(study_results.c.study_result_id)
    ).all()
    return _Cases(
        prob_covid=np.array([r.prob_covid for r in rows], dtype=float),
        predicted_label=[r.predicted_label for r in rows],
        true_label=[r.true_label for r in rows],
        label_status=[r.label_status for r in rows],
        threshold=threshold,
    )


def reject_counts(session: Session, window: Window) -> dict[str, Any]:
    """Files received in the window by final state, and rejected/failed ones by reason code."""
    by_state = dict(session.execute(
        select(Instance.state, func.count()).where(*_in_window(Instance.created_at, window)).group_by(Instance.state)
    ).all())
    by_reason: dict[str, dict[str, int]] = {}
    for state, reason, count in session.execute(
        select(Instance.state, Instance.reason, func.count())
        .where(Instance.state.in_([InstanceState.rejected.value, InstanceState.failed.value]),
               *_in_window(Instance.created_at, window))
        .group_by(Instance.state, Instance.reason)
    ):
        by_reason.setdefault(state, {})[reason or "unspecified"] = count
    return {"files": sum(by_state.values()), "by_state": by_state, "by_reason": by_reason}


# --- computing one report ---------------------------------------------------------------------------


def score_distribution(cases: _Cases) -> dict[str, Any]:
    """Histogram of P(covid) on fixed tenths, overall and by true label, with quantiles."""
    edges = np.array(SCORE_BIN_EDGES)

    def histogram(mask: np.ndarray) -> list[int]:
        return [int(c) for c in np.histogram(cases.prob_covid[mask], bins=edges)[0]]

    truth = np.array([label or "" for label in cases.true_label], dtype=object)
    everything = np.ones(cases.prob_covid.size, dtype=bool)
    counts = {"all": histogram(everything), **{name: histogram(truth == name) for name in CLASS_NAMES},
              "unlabelled": histogram(truth == "")}
    quantiles = None
    if cases.prob_covid.size:
        values = np.quantile(cases.prob_covid, [0.05, 0.25, 0.5, 0.75, 0.95])
        quantiles = dict(zip(("p05", "p25", "median", "p75", "p95"), (float(v) for v in values), strict=False))
    return {"bin_edges": list(SCORE_BIN_EDGES), "counts": counts, "quantiles": quantiles,
            "mean": float(cases.prob_covid.mean()) if cases.prob_covid.size else None}


def compute_report(cases: _Cases, level: str, reference: dict[str, Any] | None,
                   bootstrap: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """The metrics JSON of one report and its flags; pure (no database, no files)."""
    labelled = cases.labelled
    truth = [label for label, keep in zip(cases.true_label, labelled, strict=False) if keep]
    performance = binary_report(truth, cases.prob_covid[labelled], threshold=cases.threshold, positive=POSITIVE,
                                classes=CLASS_NAMES,
                                bootstrap=BOOTSTRAP_RESAMPLES if bootstrap is None else bootstrap)
    served = np.array([label == POSITIVE for label in cases.predicted_label], dtype=bool)
    mismatches = int(np.sum(served != (cases.prob_covid >= cases.threshold)))
    conflicts = sum(1 for status in cases.label_status if status == "conflict")
    population = {
        "predictions": int(cases.prob_covid.size),
        "labelled": int(labelled.sum()),
        "unlabelled": int(cases.prob_covid.size - labelled.sum() - conflicts),
        "conflicting_labels": conflicts,
        "predicted": {name: int(sum(1 for p in cases.predicted_label if p == name)) for name in CLASS_NAMES},
        "decision_mismatches": mismatches,
    }
    if level == "image":
        drift = drift_report(reference, cases.prob_covid, cases.image_mean, cases.image_std)
    else:
        drift = {"status": "not_applicable", "reason": "the training reference describes images, see the image-level report",
                 "flags": [], **{name: None for name in QUANTITIES}}
    flags = list(drift["flags"])
    if performance["n"] == 0:
        flags.append(FLAG_NO_LABELS)
    if conflicts:
        flags.append(FLAG_LABEL_CONFLICTS)
    if mismatches:
        flags.append(FLAG_DECISION_MISMATCH)
    metrics = {"performance": performance, "population": population, "score_distribution": score_distribution(cases),
               "drift": drift}
    return metrics, flags


# --- files: plots and the HTML page -------------------------------------------------------------------


def report_dir(settings: Settings, window: Window, model_version: str, level: str) -> Path:
    safe_version = re.sub(r"[^A-Za-z0-9._-]", "_", model_version)
    return settings.reports.expanduser().resolve() / window.name / window.period / f"{safe_version}-{level}"


def write_plots(metrics: dict[str, Any], cases: _Cases, out_dir: Path, title: str) -> dict[str, str]:
    """PNG plots of one report: the confusion matrix needs labelled cases, the ROC curve both classes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    performance = metrics["performance"]
    if performance["n"]:
        plot_confusion_matrix(performance, out_dir / "confusion_matrix.png", title)
        paths["confusion_matrix"] = str(out_dir / "confusion_matrix.png")
    if performance["roc_auc"]["value"] is not None:
        labelled = cases.labelled
        predictions = [{"label": label, "score": float(score)}
                       for label, score in zip((t for t in cases.true_label if t is not None), cases.prob_covid[labelled], strict=False)]
        plot_roc(performance, [p["label"] for p in predictions],
                 [RocCurve("model", [p["score"] for p in predictions], performance["roc_auc"])], out_dir / "roc_curve.png")
        paths["roc_curve"] = str(out_dir / "roc_curve.png")
    plot_score_histogram(metrics["score_distribution"], performance, out_dir / "score_histogram.png", title)
    paths["score_histogram"] = str(out_dir / "score_histogram.png")
    return paths


# --- storing ---------------------------------------------------------------------------------------


def store_report(session: Session, values: dict[str, Any]) -> None:
    """Insert the report, or replace the one of the same window, period, model version and level."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(EvaluationReport).values(**values)
    key = ("window", "period", "model_version", "level")
    statement = statement.on_conflict_do_update(
        index_elements=list(key),
        set_={name: statement.excluded[name] for name in values if name not in key},
    )
    session.execute(statement)


def run_evaluation(settings: Settings, window: str = "24h", model_version: str | None = None,
                   now: datetime | None = None) -> list[ReportSummary]:
    """Evaluate every model version with predictions in the window (or just ``model_version``).

    Writes one report per level and model version, replacing an earlier run of the same window and
    day; returns what was stored. A model version with predictions but no labels still gets a
    report (volume, score distribution, drift; its metrics undefined and flagged).

    Raises
    ------
    DatasetError
        Unknown window, or ``model_version`` has no predictions in the window.
    SchemaOutOfDate
        The database is not at the code's schema revision.
    """
    check_schema(settings)
    resolved = resolve_window(window, now)
    summaries: list[ReportSummary] = []
    with session_scope(settings) as session:
        versions = model_versions_in_window(session, resolved)
        if model_version is not None:
            if model_version not in versions:
                raise DatasetError(f"model version {model_version!r} has no predictions in window {resolved.describe()}",
                                      reason="no_predictions")
            versions = [model_version]
        rejects = reject_counts(session, resolved)
        for version in versions:
            record = _model_record(session, settings, version)
            metadata = dict(record.metadata_json or {}) if record is not None else {}
            model_name = f"{record.name} {version}" if record is not None else version
            image_cases = _image_cases(session, resolved, version, record)
            study_cases = _study_cases(session, resolved, version, image_cases.threshold)
            for level, cases in (("image", image_cases), ("study", study_cases)):
                if cases.prob_covid.size == 0:
                    continue
                summaries.append(_write_one(session, settings, resolved, version, model_name, level, cases,
                                            metadata, rejects))
    for summary in summaries:
        log.info("evaluation %s %s %s: n=%d, flags %s, %s", summary.window, summary.model_version, summary.level,
                 summary.n, summary.flags or "none", summary.html_path)
    return summaries


def _write_one(session: Session, settings: Settings, window: Window, version: str, model_name: str, level: str,
               cases: _Cases, metadata: dict[str, Any], rejects: dict[str, Any]) -> ReportSummary:
    metrics, flags = compute_report(cases, level, metadata.get("reference"))
    metrics["rejects"] = rejects
    metrics["model"] = {"name_version": model_name,
                        **{key: metadata.get(key) for key in ("decision_threshold", "preprocessing_version",
                                                              "class_names")}}
    metrics["window"] = {"name": window.name, "start": window.start.isoformat() if window.start else None,
                         "end": window.end.isoformat()}
    title = f"covid-cxr evaluation: {model_name}, {level} level, window {window.describe()}"
    text_report = render_window_text(metrics, flags, model=model_name, level=level, window=window.describe())
    out_dir = report_dir(settings, window, version, level)
    plots = write_plots(metrics, cases, out_dir, f"{version}, {level} level, {window.name} to {window.period}")
    html_path = out_dir / "report.html"
    html_path.write_text(render_html_page(title, metrics["performance"], flags, plots, text_report), encoding="utf-8")
    store_report(session, {
        "window": window.name, "window_start": window.start, "window_end": window.end, "period": window.period,
        "model_version": version, "level": level, "n": metrics["performance"]["n"],
        "metrics": _json_ready(metrics), "text_report": text_report, "flags": flags, "plot_paths": plots,
        "html_path": str(html_path), "created_at": datetime.now(UTC),
    })
    performance = metrics["performance"]
    return ReportSummary(version, level, window.name, window.period, performance["n"], flags, str(html_path),
                         performance["accuracy"]["value"], performance["roc_auc"]["value"])


def _json_ready(value: Any) -> Any:
    """Tuples to lists and numpy scalars to Python numbers, so the stored JSON reads back identical."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def latest_reports(settings: Settings, model_version: str | None = None) -> list[EvaluationReport]:
    """Latest report per model version and level: most recently evaluated version first, image before study."""
    check_schema(settings)
    with session_scope(settings) as session:
        query = select(EvaluationReport).order_by(EvaluationReport.created_at.desc(), EvaluationReport.id.desc())
        if model_version is not None:
            query = query.where(EvaluationReport.model_version == model_version)
        latest: dict[tuple[str, str], EvaluationReport] = {}
        newest_of_version: dict[str, datetime] = {}
        for report in session.scalars(query):
            latest.setdefault((report.model_version, report.level), report)
            newest_of_version.setdefault(report.model_version, report.created_at)
        return sorted(latest.values(), key=lambda r: (-newest_of_version[r.model_version].timestamp(),
                                                      r.model_version, LEVELS.index(r.level)))


# --- the Celery task -------------------------------------------------------------------------------


@shared_task(bind=True, name=EVALUATE_TASK)
def evaluate(self: Any, window: str = "24h", model_version: str | None = None) -> dict[str, Any]:
    """Celery task: :func:`run_evaluation` with the worker's settings (scheduled nightly by beat)."""
    settings: Settings = self.app.covid_cxr_settings
    summaries = run_evaluation(settings, window, model_version)
    return {"window": window, "reports": [summary.to_dict() for summary in summaries]}

