"""The ``covid-cxr`` console command: one parser; each package registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial

import db.cli
import ingest.cli
import ingest.retention_cli
import model_store.cli
import model_store.explain
import model_store.quality_cli
import taskqueue.cli
import worker.cli
import worker.evaluation_cli
from covid_cxr.commandline import EXIT_ERROR, EXIT_USAGE, Subparsers, common_options
from covid_cxr.errors import CovidCxrError, UsageError
from covid_cxr.safe_output import log_handler, log_warnings, printable
from service import deliver_command, ingest_command, receive_command, serve_command, web_command, worker_command

#: Functions that add subcommands, in the order they appear in ``--help``.
REGISTRARS: tuple[Callable[[Subparsers, argparse.ArgumentParser], None], ...] = (
    partial(ingest.cli.register, explain=model_store.explain.explain_file),  # inspect
    ingest_command.register,  # ingest
    receive_command.register,  # receive
    serve_command.register,  # serve
    web_command.register,  # web
    worker_command.register,  # worker
    worker.cli.register,  # status, results
    deliver_command.register,  # deliver
    taskqueue.cli.register,  # requeue
    ingest.retention_cli.register,  # purge
    model_store.cli.register,  # train, models
    model_store.quality_cli.register,  # qc train|measure
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


#: Exit status of a command whose reader went away (``covid-cxr results | head``): 128 + SIGPIPE, as the shell expects.
EXIT_BROKEN_PIPE = 141
#: Files and folders the service creates are its own: archived DICOMs and the database hold PHI.
PRIVATE_UMASK = 0o077


def configure_logging(verbose: bool) -> None:
    """One line per record, control characters escaped; library noise below WARNING unless ``verbose``."""
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: an embedding program's (or pytest's) handlers stay
        root.addHandler(log_handler(sys.stderr, "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
        log_warnings()
    if not verbose:  # Alembic's per-command INFO chatter (plugins, DDL mode) tells an operator nothing
        logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except CovidCxrError as exc:
        print(f"covid-cxr {args.command}: error: {printable(exc.message)} [{exc.reason}]", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR
    except BrokenPipeError:
        # Python would print a traceback while flushing stdout at exit: point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
