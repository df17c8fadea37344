"""Where a nightly report is kept: its folder of PNG plots and HTML page, and its ``evaluation_reports`` row.

A report is identified by window, period, model version and level: storing it again replaces it,
in the folder and in the table alike.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from covid_cxr.settings import Settings
from db.models import EvaluationReport
from db.session import session_scope
from db.upsert import insert_or_update
from model_store.report_render import (
    RocCurve,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    plot_score_histogram,
)
from worker.evaluation_metrics import LEVELS, Cases
from worker.evaluation_window import Window

#: The columns that identify a report.
REPORT_KEY = ("window", "period", "model_version", "level")


def report_dir(settings: Settings, window: Window, model_version: str, level: str) -> Path:
    """``REPORTS_DIR/<window>/<period>/<version>-<level>``, the version made safe as a folder name."""
    safe_version = re.sub(r"[^A-Za-z0-9._-]", "_", model_version)
    return settings.reports.expanduser().resolve() / window.name / window.period / f"{safe_version}-{level}"


def write_plots(metrics: dict[str, Any], cases: Cases, out_dir: Path, title: str) -> dict[str, str]:
    """PNG plots of one report: the confusion matrix and the reliability diagram need labelled cases, the ROC
    curve both classes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    performance = metrics["performance"]
    if performance["n"]:
        plot_confusion_matrix(performance, out_dir / "confusion_matrix.png", title)
        paths["confusion_matrix"] = str(out_dir / "confusion_matrix.png")
    if performance["roc_auc"]["value"] is not None:
        model = RocCurve("model", cases.prob_covid[cases.labelled], performance["roc_auc"])
        plot_roc(performance, cases.labelled_truth, [model], out_dir / "roc_curve.png")
        paths["roc_curve"] = str(out_dir / "roc_curve.png")
    plot_score_histogram(metrics["score_distribution"], performance, out_dir / "score_histogram.png", title)
    paths["score_histogram"] = str(out_dir / "score_histogram.png")
    calibration = metrics.get("calibration")
    if performance["n"] and calibration and any(row["n"] for row in calibration["bins"]):
        plot_reliability(calibration, out_dir / "reliability.png")
        paths["reliability"] = str(out_dir / "reliability.png")
    return paths


def store_report(session: Session, values: dict[str, Any]) -> None:
    """Insert the report's row, or replace the one of the same window, period, model version and level."""
    insert_or_update(session, EvaluationReport, [values], key=REPORT_KEY)


def latest_reports(settings: Settings, model_version: str | None = None) -> list[EvaluationReport]:
    """Latest report per model version and level: most recently evaluated version first, image before study."""
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
