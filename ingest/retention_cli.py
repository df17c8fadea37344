"""``covid-cxr purge``: delete old archived and quarantined files and drop old normalized images (rows stay)."""

from __future__ import annotations

import argparse
import json
import sys

from covid_cxr.commandline import EXIT_USAGE, Subparsers, settings_from_args
from covid_cxr.safe_output import printable
from covid_cxr.timespec import duration_argument


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``purge``; `common` is the parent parser with the installation flags."""
    purge = subparsers.add_parser(
        "purge", parents=[common], help="delete old archived/quarantined files and normalized images; rows stay",
        description="For instances recorded more than --older-than ago and in a final state: delete their "
                    "archived files (--archive), their quarantined files and reason markers (--quarantine), "
                    "and drop the normalized images of predicted ones (--images). Predictions, study results, "
                    "labels and reports stay; each row records what was purged and when (stored_path null, "
                    "purged_at). Nothing outside the archive and quarantine folders is ever deleted.")
    purge.add_argument("--older-than", required=True, type=duration_argument, metavar="AGE",
                       help="recorded more than AGE ago: a number and a unit, e.g. 30d, 12h, 2w")
    purge.add_argument("--archive", action="store_true", help="delete archived files")
    purge.add_argument("--quarantine", action="store_true", help="delete quarantined files and their reason markers")
    purge.add_argument("--images", action="store_true", help="drop normalized images of predicted instances")
    purge.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    purge.add_argument("--json", action="store_true", help="machine-readable output")
    purge.set_defaults(func=_purge)


def _purge(args: argparse.Namespace) -> int:
    from db.migrate import check_schema
    from ingest.retention import FolderPurge, purge

    if not (args.archive or args.quarantine or args.images):
        print("covid-cxr purge: error: say what to purge: --archive, --quarantine and/or --images", file=sys.stderr)
        return EXIT_USAGE
    settings = settings_from_args(args)
    check_schema(settings)
    report = purge(settings, older_than=args.older_than, archive=args.archive, quarantine=args.quarantine,
                   images=args.images, dry_run=args.dry_run)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    verb = "would be" if report.dry_run else "were"

    def folder_line(name: str, result: FolderPurge, what: str) -> None:
        print(f"{name:<12} {result.files} {what} ({_mb(result.bytes)}) {verb} deleted; "
              f"{result.already_gone} already gone")
        for path in result.refused:
            print(f"{'':<12} refused (not a regular file inside the folder): {printable(path)}")

    print(f"{'purge':<12} recorded before {report.cutoff.isoformat(timespec='seconds')}"
          f"{' (dry run: nothing deleted)' if report.dry_run else ''}")
    if report.archive is not None:
        folder_line("archive", report.archive, "file(s)")
    if report.quarantine is not None:
        folder_line("quarantine", report.quarantine, "file(s) and reason marker(s)")
    if args.images:
        print(f"{'images':<12} {report.images} normalized image(s) of predicted instances ({_mb(report.image_bytes)}) "
              f"{verb} dropped; predictions, labels and reports stay")
    return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
