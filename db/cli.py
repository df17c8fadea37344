"""Command-line subcommands owned by the `db` package: ``covid-cxr db upgrade|current``."""

from __future__ import annotations

import argparse

from covid_cxr.commandline import Subparsers, settings_from_args


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands; `common` is the parent parser with the installation flags."""
    db_parser = subparsers.add_parser("db", help="database schema migrations")
    db_sub = db_parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = db_sub.add_parser("upgrade", parents=[common], help="apply Alembic migrations up to the code's head")
    upgrade.set_defaults(func=_upgrade)
    current = db_sub.add_parser("current", parents=[common],
                                help="print the schema revision and whether it is up to date")
    current.set_defaults(func=_current)


def _upgrade(args: argparse.Namespace) -> int:
    from db.migrate import upgrade

    settings = settings_from_args(args)
    revision = upgrade(settings)
    print(f"database schema at revision {revision}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from db.migrate import current_revision, head_revision
    from db.session import create_engine_for

    settings = settings_from_args(args)
    current = current_revision(create_engine_for(settings))
    head = head_revision()
    print(f"current: {current or '(none)'}  head: {head}  {'up to date' if current == head else 'OUT OF DATE'}")
    return 0 if current == head else 1
