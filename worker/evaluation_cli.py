"""Command-line subcommands for ground truth and evaluation: ``labels import``, ``evaluate``, ``report``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from covid_cxr.commandline import EXIT_ERROR, Subparsers, settings_from_args
from covid_cxr.constants import DEFAULT_EVALUATION_WINDOW, EVALUATION_WINDOWS


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this module's subcommands; `common` is the parent parser with the installation flags."""
    labels = subparsers.add_parser("labels", help="ground-truth labels (RT-PCR, radiologist reads)")
    labels_sub = labels.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    import_parser = labels_sub.add_parser(
        "import", parents=[common], help="import a labels CSV (idempotent; changed labels are recorded)",
        description="Columns: label, source, date and one key column: StudyInstanceUID, SOPInstanceUID or "
                    "AccessionNumber. Problems are reported by line; valid rows are loaded. Exit status 1 "
                    "when any line had an error.")
    import_parser.add_argument("file", type=Path, metavar="FILE.csv")
    import_parser.add_argument("--json", action="store_true", help="print the result as JSON")
    import_parser.set_defaults(func=_labels_import)

    evaluate = subparsers.add_parser(
        "evaluate", parents=[common], help="evaluate predictions of a window against ground truth, store reports",
        description="The nightly job, by hand: one report per model version and level (image, study), "
                    "replacing an earlier report of the same window and day.")
    evaluate.add_argument("--window", choices=EVALUATION_WINDOWS, default=DEFAULT_EVALUATION_WINDOW,
                          help=f"time window ending now (default {DEFAULT_EVALUATION_WINDOW})")
    evaluate.add_argument("--model", metavar="VERSION", help="only this model version")
    evaluate.add_argument("--include-flagged", action="store_true",
                          help="keep images a quality check flagged (and their studies) in the metrics; by default "
                               "they are left out and counted")
    evaluate.set_defaults(func=_evaluate)

    report = subparsers.add_parser("report", parents=[common],
                                   help="print the latest evaluation report per model version")
    report.add_argument("--json", action="store_true", help="print the reports as JSON")
    report.add_argument("--model", metavar="VERSION", help="only this model version")
    report.set_defaults(func=_report)


def _labels_import(args: argparse.Namespace) -> int:
    from db.labels import import_labels
    from db.migrate import check_schema

    settings = settings_from_args(args)
    check_schema(settings)
    result = import_labels(settings, args.file)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{result.file_name}: {result.rows} rows: {result.added} added, {result.changed} changed, "
              f"{result.updated} date updated, {result.unchanged} unchanged, {len(result.errors)} with errors, "
              f"{len(result.warnings)} warnings")
        for problem in result.problems:
            print(f"  {problem}")
    return EXIT_ERROR if result.errors else 0


def _evaluate(args: argparse.Namespace) -> int:
    from db.migrate import check_schema
    from worker.evaluation import run_evaluation

    settings = settings_from_args(args)
    check_schema(settings)
    summaries = run_evaluation(settings, args.window, args.model, include_flagged=args.include_flagged)
    if not summaries:
        print(f"no predictions in window {args.window}: no report written")
    for summary in summaries:
        accuracy = "undefined" if summary.accuracy is None else f"{summary.accuracy:.4f}"
        auc = "undefined" if summary.roc_auc is None else f"{summary.roc_auc:.4f}"
        print(f"{summary.model_version} {summary.level} {summary.window} {summary.period}: n={summary.n} "
              f"accuracy {accuracy} ROC AUC {auc} flags {', '.join(summary.flags) or 'none'}\n  {summary.html_path}")
    return 0


def _report_dict(report: Any) -> dict[str, Any]:
    return {
        "model_version": report.model_version, "level": report.level, "window": report.window,
        "period": report.period, "window_start": report.window_start.isoformat() if report.window_start else None,
        "window_end": report.window_end.isoformat(), "n": report.n, "flags": report.flags,
        "metrics": report.metrics, "plot_paths": report.plot_paths, "html_path": report.html_path,
        "created_at": report.created_at.isoformat(),
    }


def _report(args: argparse.Namespace) -> int:
    from db.migrate import check_schema
    from worker.evaluation_store import latest_reports

    settings = settings_from_args(args)
    check_schema(settings)
    reports = latest_reports(settings, args.model)
    if args.json:
        print(json.dumps([_report_dict(r) for r in reports], indent=2))
        return 0
    if not reports:
        print("no evaluation report yet: run `covid-cxr evaluate` (or wait for the nightly job)")
    for report in reports:
        print(f"=== {report.model_version} / {report.level} / window {report.window} ending {report.period}"
              f" (written {report.created_at:%Y-%m-%d %H:%M} UTC) ===")
        print(report.text_report)
        print(f"page: {report.html_path}\n")
    return 0
