"""The stuck list: inbox entries that cannot be processed yet, each with its cause, in the database.

``status`` (and ``status --json``) show it, so an entry the ingester keeps failing on is visible
instead of looping silently; a row goes once its file is processed or gone.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select

from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import StuckFile
from db.session import session_scope
from db.upsert import insert_or_update

#: Who is trying: several ingesters may share one inbox and one database.
INGESTER = f"{socket.gethostname()}:{os.getpid()}"


def mark_stuck(settings: Settings, file_name: str, cause: Reason, message: str, attempts: int) -> None:
    """Record (or refresh) ``file_name`` as stuck with its ``cause``; the first sighting keeps its time."""
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        insert_or_update(
            session, StuckFile,
            [{"file_name": file_name, "cause": cause, "message": message, "attempts": attempts,
              "ingester": INGESTER, "first_seen": now, "last_seen": now}],
            key=["file_name"], update=["cause", "message", "attempts", "ingester", "last_seen"],
        )


def clear_stuck(settings: Settings, file_names: list[str]) -> None:
    """Forget entries that were processed, or left the inbox."""
    if file_names:
        with session_scope(settings) as session:
            session.execute(delete(StuckFile).where(StuckFile.file_name.in_(file_names)))


def stuck_files(settings: Settings) -> list[dict[str, Any]]:
    """Every stuck entry, oldest first, as plain data (``age_seconds`` since it was first seen)."""
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        rows = session.scalars(select(StuckFile).order_by(StuckFile.first_seen, StuckFile.id)).all()
        return [{"file_name": row.file_name, "cause": row.cause, "message": row.message, "attempts": row.attempts,
                 "ingester": row.ingester, "first_seen": row.first_seen.isoformat(),
                 "age_seconds": (now - _aware(row.first_seen)).total_seconds()} for row in rows]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
