"""Command-line helpers every package's subcommands share: the installation flags and the exit codes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeAlias

from covid_cxr.settings import Settings, load_settings

#: Exit code for an error covid-cxr reports on purpose (bad config, bad dataset, no model...).
EXIT_ERROR = 1
#: Exit code for a usage error (argparse uses 2 as well).
EXIT_USAGE = 2

#: What ``register`` functions receive: the ``add_subparsers`` action of the ``covid-cxr`` parser.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts; each overrides the matching ``COVID_CXR_*`` variable."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("installation")
    group.add_argument("--data-dir", type=Path,
                       help="root for database, inbox, archive, quarantine, reports (COVID_CXR_DATA_DIR)")
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
