"""What each dashboard page shows: one function per page gathers its template's context."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from covid_cxr.settings import Settings
from db.session import session_scope
from web.charts import rate_chart
from web.queries import (
    WINDOW_ORDER,
    disk_space,
    evaluation_report,
    evaluation_reports,
    normalized_png,
    recent_rejections,
    throughput,
)

#: Keys of ``status_report`` the overview shows in panels of their own; any other key is listed as it is.
OVERVIEW_KEYS = frozenset({"database", "broker", "instances", "predictions", "studies", "active_model", "last_error",
                           "last_rejection", "oldest_pending", "queues", "queue_error", "stuck_files", "overdue"})
#: Rows on the results and rejects pages unless ``?limit=`` says otherwise, and the most it may say.
DEFAULT_ROWS = 50
MAX_ROWS = 500


def overview(settings: Settings, request: Request) -> dict[str, Any]:
    """Counts by state, rates over the last hour, queues, waiting and overdue work, stuck inbox entries, disk, model."""
    from worker.results import status_report

    now = datetime.now(UTC)
    status = status_report(settings)
    with session_scope(settings) as session:
        rates = throughput(session, now)
    return {
        "status": status,
        # Whatever else `covid-cxr status` learns to report appears on the overview without a change here.
        "more_status": {key: value for key, value in status.items() if key not in OVERVIEW_KEYS},
        "charts": [rate_chart("Files recorded", "files", rates["files"], now),
                   rate_chart("Predictions written", "predictions", rates["predictions"], now)],
        "disk": disk_space(settings.data_dir),
    }


def rejects(settings: Settings, request: Request) -> dict[str, Any]:
    """The latest rejected files with their reason, message, header facts and stored model view."""
    with session_scope(settings) as session:
        rows = recent_rejections(session, _limit(request))
    return {"rejections": rows}


def results(settings: Settings, request: Request) -> dict[str, Any]:
    """The latest study results and images (as ``covid-cxr results``), optionally of one study."""
    from worker.results import recent_results

    study = request.query_params.get("study") or None
    return {"results": recent_results(settings, limit=_limit(request), study_uid=study), "study": study}


def evaluation(settings: Settings, request: Request) -> dict[str, Any]:
    """Stored evaluation reports grouped by window, newest first, with their plots and drift status."""
    with session_scope(settings) as session:
        reports = [_report_row(report) for report in evaluation_reports(session)]
    windows: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(reports, key=_report_order):
        windows.setdefault(row["window"], []).append(row)
    return {"windows": windows}


def models(settings: Settings, request: Request) -> dict[str, Any]:
    """The registry: every version, the active one, and when and by what command each was activated."""
    from model_store.registry import list_models, summary

    rows = [summary(record) for record in list_models(settings)]
    return {"models": rows, "active": [row for row in rows if row["active"]]}


def model_view(settings: Settings, request: Request) -> Response:
    """The stored 224x224 model input of one instance (PNG), never the archived DICOM file."""
    with session_scope(settings) as session:
        png = normalized_png(session, request.path_params["instance_id"])
    if png is None:
        raise HTTPException(404, "no model view stored for this instance")
    return Response(png, media_type="image/png")


def report_plot(settings: Settings, request: Request) -> Response:
    """One plot of a stored report, only if the report lists it."""
    report = _stored_report(settings, request)
    path = (report.plot_paths or {}).get(request.path_params["plot"])
    return _report_file(path, "image/png")


def report_page(settings: Settings, request: Request) -> Response:
    """A stored report's self-contained HTML page (plots embedded)."""
    return _report_file(_stored_report(settings, request).html_path, "text/html")


def _stored_report(settings: Settings, request: Request) -> Any:
    with session_scope(settings) as session:
        report = evaluation_report(session, request.path_params["report_id"])
    if report is None:
        raise HTTPException(404, "no such evaluation report")
    return report


def _report_file(path: str | None, media_type: str) -> Response:
    if not path or not Path(path).is_file():
        raise HTTPException(404, "the report's file is not on this machine")
    return FileResponse(path, media_type=media_type)


def _report_row(report: Any) -> dict[str, Any]:
    metrics = report.metrics or {}
    performance = metrics.get("performance") or {}
    drift = metrics.get("drift") or {}
    return {
        "id": report.id, "window": report.window, "period": report.period, "model_version": report.model_version,
        "level": report.level, "n": report.n, "created_at": report.created_at,
        "window_start": report.window_start, "window_end": report.window_end,
        "accuracy": _value(performance.get("accuracy")), "roc_auc": _value(performance.get("roc_auc")),
        "sensitivity": _value(performance.get("sensitivity")), "specificity": _value(performance.get("specificity")),
        "predictions": (metrics.get("population") or {}).get("predictions"),
        "drift": drift.get("status"), "flags": list(report.flags or []),
        "plots": sorted((report.plot_paths or {}).keys()), "has_page": bool(report.html_path),
    }


def _report_order(row: dict[str, Any]) -> tuple[int, str, str, int]:
    """Windows in their usual order; in each, the latest period first, image level before study level."""
    window = WINDOW_ORDER.index(row["window"]) if row["window"] in WINDOW_ORDER else len(WINDOW_ORDER)
    period = "".join(chr(0x10FFFF - ord(c)) for c in row["period"])  # descending
    return window, period, row["model_version"], 0 if row["level"] == "image" else 1


def _value(entry: Any) -> float | None:
    """A metric stored either as a number or as ``{"value": ..., "ci": ...}``."""
    value = entry.get("value") if isinstance(entry, dict) else entry
    return float(value) if isinstance(value, int | float) else None


def _limit(request: Request) -> int:
    try:
        limit = int(request.query_params.get("limit", DEFAULT_ROWS))
    except ValueError:
        return DEFAULT_ROWS
    return max(1, min(limit, MAX_ROWS))
