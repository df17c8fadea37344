"""The ``covid-cxr`` console command: one parser; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import db.cli
import ingest.cli
import model_store.cli
import worker.cli
import worker.evaluation_cli
from covid_cxr.commandline import EXIT_ERROR, Subparsers, common_options
from covid_cxr.errors import CovidCxrError
from service import ingest_command, serve_command, worker_command

#: Functions that add subcommands, in the order they appear in ``--help``.
REGISTRARS: tuple[Callable[[Subparsers, argparse.ArgumentParser], None], ...] = (
    ingest.cli.register,  # inspect
    ingest_command.register,  # ingest
    serve_command.register,  # serve
    worker_command.register,  # worker
    worker.cli.register,  # status, results
    model_store.cli.register,  # train, models
    worker.evaluation_cli.register,  # labels, evaluate, report
    db.cli.register,  # db upgrade|current
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covid-cxr",
        description="Classify chest radiographs (DICOM) for COVID-19: ingest, infer, store, evaluate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    for register in REGISTRARS:
        register(subparsers, common)
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
