"""The evaluation job and its Celery task: predictions of a time window against ground truth, stored as reports.

For every model version with predictions in the window it writes one ``evaluation_reports`` row per
level (``image``; ``study`` when study results exist), replacing an earlier run of the same window
and day, plus PNG plots and one self-contained HTML page under ``settings.reports``. The steps live
in their own modules: gather the window's cases (:mod:`worker.evaluation_window`), compute the
metrics (:mod:`worker.evaluation_metrics`), render (:mod:`model_store.report_render`) and store
(:mod:`worker.evaluation_store`). Never imports TensorFlow: it runs in the CPU worker and in the
command-line process.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from celery import shared_task
from sqlalchemy.orm import Session

from covid_cxr.constants import DEFAULT_EVALUATION_WINDOW
from covid_cxr.errors import DatasetError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.session import session_scope
from model_store.report_render import render_html_page, render_window_text
from taskqueue.names import EVALUATE_TASK
from worker.evaluation_metrics import Cases, compute_report, json_ready
from worker.evaluation_store import report_dir, store_report, write_plots
from worker.evaluation_window import (
    Window,
    flagged_cases,
    image_cases,
    model_record,
    model_versions_in_window,
    quality_counts,
    reject_counts,
    resolve_window,
    study_cases,
)

log = logging.getLogger(__name__)


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


def run_evaluation(settings: Settings, window: str = DEFAULT_EVALUATION_WINDOW, model_version: str | None = None,
                   now: datetime | None = None, *, include_flagged: bool = False) -> list[ReportSummary]:
    """Evaluate every model version with predictions in the window (or just ``model_version``).

    Writes one report per level and model version, replacing an earlier run of the same window and
    day; returns what was stored. A model version with predictions but no labels still gets a
    report (volume, score distribution, drift; its metrics undefined and flagged). Images a quality
    check flagged, and studies with such an image, are left out of the metrics (and counted in the
    report) unless ``include_flagged``. The database schema is checked once by the command or worker
    that runs this, not here.

    Raises
    ------
    DatasetError
        Unknown window, or ``model_version`` has no predictions in the window.
    """
    resolved = resolve_window(window, now)
    summaries: list[ReportSummary] = []
    with session_scope(settings) as session:
        versions = model_versions_in_window(session, resolved)
        if model_version is not None:
            if model_version not in versions:
                raise DatasetError(f"model version {model_version!r} has no predictions in window "
                                   f"{resolved.describe()}", reason=Reason.NO_PREDICTIONS)
            versions = [model_version]
        rejects = reject_counts(session, resolved)
        checks = quality_counts(session, resolved)
        for version in versions:
            record = model_record(session, settings, version)
            metadata = dict(record.metadata_json or {}) if record is not None else {}
            model_name = f"{record.name} {version}" if record is not None else version
            images = image_cases(session, resolved, version, record, include_flagged=include_flagged)
            studies = study_cases(session, resolved, version, images.threshold, include_flagged=include_flagged)
            flagged = flagged_cases(session, resolved, version)
            for level, cases in (("image", images), ("study", studies)):
                if cases.prob_covid.size == 0:
                    continue
                quality = {"by_check": checks, "flagged": flagged[level], "flagged_included": include_flagged}
                summaries.append(_write_one(session, settings, resolved, version, model_name, level, cases,
                                            metadata, rejects, quality))
    for summary in summaries:
        log.info("evaluation %s %s %s: n=%d, flags %s, %s", summary.window, summary.model_version, summary.level,
                 summary.n, summary.flags or "none", summary.html_path)
    return summaries


def _write_one(session: Session, settings: Settings, window: Window, version: str, model_name: str, level: str,
               cases: Cases, metadata: dict[str, Any], rejects: dict[str, Any],
               quality: dict[str, Any]) -> ReportSummary:
    metrics, flags = compute_report(cases, level, metadata.get("reference"), calibration=metadata.get("calibration"))
    metrics["rejects"] = rejects
    metrics["quality"] = quality
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
        "metrics": json_ready(metrics), "text_report": text_report, "flags": flags, "plot_paths": plots,
        "html_path": str(html_path), "created_at": datetime.now(UTC),
    })
    performance = metrics["performance"]
    return ReportSummary(version, level, window.name, window.period, performance["n"], flags, str(html_path),
                         performance["accuracy"]["value"], performance["roc_auc"]["value"])


@shared_task(bind=True, name=EVALUATE_TASK)  # type: ignore[untyped-decorator]  # Celery ships no type hints
def evaluate(self: Any, window: str = DEFAULT_EVALUATION_WINDOW, model_version: str | None = None,
             include_flagged: bool = False) -> dict[str, Any]:
    """Celery task: :func:`run_evaluation` with the worker's settings (scheduled nightly by beat)."""
    settings: Settings = self.app.covid_cxr_settings
    summaries = run_evaluation(settings, window, model_version, include_flagged=include_flagged)
    return {"window": window, "reports": [summary.to_dict() for summary in summaries]}
