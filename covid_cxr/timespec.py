"""Durations and moments as an operator types them on the command line: ``30d``, ``12h``, ``2026-11-25T10:00``."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """``"30d"`` -> 30 days; units ``s``, ``m``, ``h``, ``d``, ``w``. Raises ``ValueError`` for anything else."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: a number and a unit, e.g. 45s, 90m, 12h, 30d, 2w")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """A moment: a duration back from ``now`` (``"2h"``) or an ISO 8601 date or time (UTC when it names no zone)."""
    try:
        return (now or datetime.now(UTC)) - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration back from now (2h, 30d) nor an ISO 8601 time "
                         f"(2026-11-25 or 2026-11-25T10:00)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def duration_argument(text: str) -> timedelta:
    """:func:`parse_duration` as an argparse ``type`` (a usage error names the problem)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def moment_argument(text: str) -> datetime:
    """:func:`parse_moment` as an argparse ``type``."""
    try:
        return parse_moment(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
