"""Command-line subcommands owned by the `worker` package."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands; `common` is the parent parser with the installation flags."""
