"""The ``covid-cxr`` console command: one parser, each package registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from covid_cxr.errors import CovidCxrError
from covid_cxr.settings import Settings, load_settings

#: Exit code for an error covid-cxr reports on purpose (bad config, bad dataset, no model...).
EXIT_ERROR = 1
#: Exit code for a usage error (argparse uses 2 as well).
EXIT_USAGE = 2


#: Modules that add subcommands, in the order they appear in ``--help``.
COMMAND_MODULES = (
    "ingest.cli",  # inspect
    "ingest.service_cli",  # ingest, serve
    "worker.cli",  # worker, status, results
    "model_store.cli",  # train, models
    "worker.evaluation_cli",  # labels, evaluate, report
    "db.cli",  # db upgrade|current
)


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts; each overrides the matching ``COVID_CXR_*`` variable."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("installation")
    group.add_argument("--data-dir", type=Path, help="root for database, inbox, archive, quarantine, reports (COVID_CXR_DATA_DIR)")
    group.add_argument("--database-url", help="SQLAlchemy URL (COVID_CXR_DATABASE_URL)")
    group.add_argument("--broker-url", help="Celery broker URL (COVID_CXR_BROKER_URL)")
    return parent


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from the environment, overridden by the common flags and ``extra`` (``None`` = not given)."""
    return load_settings(
        data_dir=getattr(args, "data_dir", None),
        database_url=getattr(args, "database_url", None),
        broker_url=getattr(args, "broker_url", None),
        **extra,
    )


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="covid-cxr",
        description="Classify chest radiographs (DICOM) for COVID-19: ingest, infer, store, evaluate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # Alembic's per-command INFO chatter (plugins, DDL mode) tells an operator nothing
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except CovidCxrError as exc:
        print(f"covid-cxr {args.command}: error: {exc.message} [{exc.reason}]", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
