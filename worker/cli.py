"""Command-line subcommands owned by the `worker` package: ``covid-cxr status`` and ``results``."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from covid_cxr.commandline import Subparsers, settings_from_args
from covid_cxr.errors import UsageError
from covid_cxr.safe_output import printable, printable_lines, spreadsheet_cell

log = logging.getLogger(__name__)

#: Stuck inbox entries listed one per line in the text ``status`` (``--json`` has them all).
STUCK_LISTED = 10

#: Columns of the ``results --format table`` image listing (CSV and JSON carry every column).
_IMAGE_TABLE_COLUMNS = ("instance_id", "created_at", "state", "reason", "view_position", "prob_covid", "label",
                        "model_version", "study_label", "sop_instance_uid", "flags")
#: Where the values of the ``status`` lines start, so a continuation line lines up under them.
_STATUS_INDENT = " " * len("last error   ")


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands; `common` is the parent parser with the installation flags."""
    status = subparsers.add_parser(
        "status", parents=[common], help="counts by state, queue depth, active model, last error")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)

    results = subparsers.add_parser("results", parents=[common], help="recent study and image results")
    results.add_argument("--format", choices=("table", "csv", "json"), default="table",
                         help="table (default), csv (one row per image, with its study result) or json")
    results.add_argument("--limit", type=int, default=20, help="at most this many studies and images (default 20)")
    results.add_argument("--study", metavar="UID", help="only this StudyInstanceUID")
    results.set_defaults(func=_results)


def _status(args: argparse.Namespace) -> int:
    from db.migrate import check_schema
    from worker.results import status_report

    settings = settings_from_args(args)
    check_schema(settings)
    report = status_report(settings)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(printable_lines(format_status(report)))
    return 0


def format_status(report: dict[str, Any]) -> str:
    """The human-readable ``status`` text."""
    counts = report["instances"]
    states = " · ".join(f"{state} {count}" for state, count in counts.items() if state != "total")
    if report["queue_error"]:
        queues = report["queue_error"]
    else:
        queues = " · ".join(f"{name} {depth}" for name, depth in report["queues"].items())
    model = report["active_model"]
    model_line = ("none active: import one with `covid-cxr models import` or train one with `covid-cxr train`"
                  if model is None else
                  f"{model['name']} {model['version']} (sha256 {model['sha256'][:12]}…, "
                  f"threshold {model['decision_threshold']}, preprocessing {model['preprocessing_version']})")
    lines = [
        f"database     {report['database']}",
        f"broker       {report['broker']}",
        f"instances    {states} (total {counts['total']})",
        f"predictions  {report['predictions']} · studies {report['studies']}",
        f"quality      {_quality_line(report.get('quality') or {})}",
        f"queue depth  {queues}",
        f"model        {model_line}",
        f"last error   {_problem_line(report['last_error'])}",
        f"last reject  {_problem_line(report['last_rejection'])}",
    ]
    stuck = report.get("stuck_files") or []
    lines.append(f"stuck files  {len(stuck) or 'none'}")
    lines += [f"  {entry['file_name']}: {entry['cause']} for {entry['age_seconds']:.0f} s "
              f"({entry['attempts']} attempt(s)): {entry['message']}" for entry in stuck[:STUCK_LISTED]]
    if len(stuck) > STUCK_LISTED:
        lines.append(f"  … and {len(stuck) - STUCK_LISTED} more (status --json lists them all)")
    pending = report["oldest_pending"]
    if pending:
        lines.append(f"oldest wait  instance {pending['instance_id']} {pending['state']} for "
                     f"{pending['age_seconds']:.0f} s (attempts {pending['attempts']})")
    if "overdue" in report:
        lines.append(f"overdue      {_overdue_line(report['overdue'])}")
    if "ingest" in report:
        lines.append(f"ingest       {_ingest_line(report['ingest'])}")
    lines += _outbox_lines(report.get("outbox"))
    return "\n".join(lines) + "\n"


def _outbox_lines(outbox: dict[str, Any] | None) -> list[str]:
    """The DICOM results outbox: deliveries per state, reports still to make, the latest dead letter."""
    if not outbox or not (outbox["documents"] or outbox["results_without_report"]):
        return []
    states = " · ".join(f"{state} {count}" for state, count in outbox["deliveries"].items())
    waiting = outbox["results_without_report"]
    lines = [f"outbox       {states} · reports {outbox['documents']}"
             + ("" if waiting is None else f" · results without report {waiting}")]
    dead = outbox["last_dead"]
    if dead:
        lines.append(f"dead letter  {dead['at']} {dead['document']} -> {dead['destination']} after "
                     f"{dead['attempts']} attempt(s) {dead['reason']}: {printable(str(dead['message']))}")
    return lines


def _overdue_line(overdue: dict[str, Any]) -> str:
    if not overdue["instances"]:
        return "none"
    return (f"{overdue['instances']} instance(s) in {overdue['batches']} batch(es) without a sign of life for more "
            f"than {overdue['after_seconds']:.0f} s (longest {overdue['longest_quiet_seconds']:.0f} s): a lost batch "
            f"is re-sent at the next reconciliation")


def _ingest_line(ingest: dict[str, Any]) -> str:
    """Each ingester's watermark state; PAUSED first, since files then wait in its inbox."""
    if not ingest["ingesters"]:
        return "no ingester running"
    parts = []
    for item in sorted(ingest["ingesters"], key=lambda item: not item["paused"]):
        state = "PAUSED" if item["paused"] else "running"
        seen = f", last seen {item['age_seconds']:.0f} s ago" if item["stale"] else ""
        parts.append(f"{state} {item['name']}: {item['message']}{seen}")
    return " · ".join(parts)


def _quality_line(counts: dict[str, dict[str, int]]) -> str:
    """Outcomes per quality check, e.g. ``orientation pass 12 correct 1 · polarity pass 13``."""
    if not counts:
        return "no file checked yet"
    return " · ".join(check + "".join(f" {decision} {n}" for decision, n in decisions.items())
                      for check, decisions in counts.items())


def _problem_line(problem: dict[str, Any] | None) -> str:
    if problem is None:
        return "none"
    line = (f"{problem['at']} instance {problem['instance_id']} ({problem['state']}, attempts "
            f"{problem['attempts']}) {problem['reason']}: {problem['message']}")
    if problem["reason_description"]:
        line += f"\n{_STATUS_INDENT}{problem['reason']} means: {problem['reason_description']}"
    return line


def _results(args: argparse.Namespace) -> int:
    from db.migrate import check_schema
    from worker.results import IMAGE_COLUMNS, STUDY_COLUMNS, recent_results

    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    settings = settings_from_args(args)
    check_schema(settings)
    results = recent_results(settings, limit=args.limit, study_uid=args.study)
    if args.format == "json":
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=IMAGE_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: _csv_cell(value) for key, value in row.items()} for row in results["images"])
    else:
        sys.stdout.write(printable_lines("Studies\n" + format_table(results["studies"], STUDY_COLUMNS)))
        sys.stdout.write(printable_lines("\nImages\n" + format_table(results["images"], _IMAGE_TABLE_COLUMNS)))
    return 0


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width table; probabilities to three decimals, missing values blank."""
    if not rows:
        return "(none)\n"
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    out = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)).rstrip()]
    out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    return "\n".join(out) + "\n"


def _csv_cell(value: Any) -> Any:
    """Text values from file names and headers: shown escaped, and never evaluated by a spreadsheet; flags
    space-separated."""
    if isinstance(value, list):
        value = " ".join(str(item) for item in value)
    return spreadsheet_cell(printable(value)) if isinstance(value, str) else value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
