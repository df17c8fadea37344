"""The free-disk watermark: ingest pauses while a file system it writes to runs low, and resumes with room to spare.

Below ``ingest_pause_below_free_mb`` on the file system of the data dir (the embedded database),
the archive or the quarantine, the ingester stops taking files: they wait in the inbox, nothing is
read, recorded or moved, nothing is lost. Above ``ingest_resume_above_free_mb`` it takes them
again. Two levels, so that one file's worth of space does not switch it on and off.

Each ingester writes its state to ``ingest_status`` (one row per ingester, removed when it stops),
so that ``covid-cxr status`` and the dashboard on any machine can show it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from covid_cxr.safe_output import printable
from covid_cxr.settings import Settings
from db.models import IngestStatus
from db.session import session_scope
from db.upsert import insert_or_update

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Seconds between two measurements of the free space (statvfs is cheap; the log is what must stay quiet).
CHECK_EVERY_SECONDS = 1.0


@dataclass(frozen=True)
class DiskReading:
    """The least free space among the watched folders' file systems, and a folder on that file system."""

    path: Path
    free_bytes: int


def least_free(paths: Iterable[Path]) -> DiskReading:
    """Free space (for unprivileged users) of the fullest file system holding one of ``paths``.

    A folder that does not exist yet is measured at its nearest existing parent.
    """
    readings = []
    for path in paths:
        folder = _existing(path.expanduser().absolute())
        stats = os.statvfs(folder)
        readings.append(DiskReading(folder, stats.f_bavail * stats.f_frsize))
    return min(readings, key=lambda reading: reading.free_bytes)


def watched_folders(settings: Settings) -> list[Path]:
    """The folders ingest writes to: the data dir (the embedded database), the archive and the quarantine."""
    return [settings.data_dir, settings.archive, settings.quarantine]


class DiskWatermark:
    """Pause and resume decisions with hysteresis; :meth:`paused` measures at most every ``check_every`` seconds."""

    def __init__(self, settings: Settings, *, measure: Callable[[], DiskReading] | None = None,
                 check_every: float = CHECK_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.pause_below = settings.ingest_pause_below_free_mb * MIB
        self.resume_above = settings.ingest_resume_above_free_mb * MIB
        self._measure = measure or (lambda: least_free(watched_folders(settings)))
        self._check_every = check_every
        self._clock = clock
        self._next_check = 0.0
        self.reading: DiskReading | None = None
        self.is_paused = False
        self.paused_since: datetime | None = None
        #: Called with the new state after the first measurement and after every pause or resume.
        self.on_change: Callable[[DiskWatermark], None] | None = None

    def paused(self) -> bool:
        """Whether ingest should hold off now; measures again when the last reading is old enough."""
        now = self._clock()
        if now < self._next_check:
            return self.is_paused
        self._next_check = now + self._check_every
        first = self.reading is None
        try:
            self.reading = self._measure()
        except OSError as exc:  # cannot measure: keep the last decision rather than guess
            log.warning("cannot measure free disk space: %s", exc)
            return self.is_paused
        free = self.reading.free_bytes
        changed = first  # the status written at start said "not measured yet" until the next reconciliation
        if not self.is_paused and free < self.pause_below:
            self.is_paused, self.paused_since = True, datetime.now(UTC)
            log.warning("ingest paused: %s", self.message())
            changed = True
        elif self.is_paused and free > self.resume_above:
            self.is_paused, self.paused_since = False, None
            log.info("ingest resumed: %s", self.message())
            changed = True
        if changed:
            self._changed()
        return self.is_paused

    def message(self) -> str:
        """One line saying where the free space stands against the two levels."""
        if self.reading is None:
            return "free disk space not measured yet"
        free = self.reading.free_bytes / MIB
        where = printable(str(self.reading.path))
        if self.is_paused:
            return (f"{free:.0f} MiB free on {where}, below {self.pause_below // MIB} MiB; files wait in the inbox "
                    f"until more than {self.resume_above // MIB} MiB are free")
        return f"{free:.0f} MiB free on {where} (pauses below {self.pause_below // MIB} MiB)"

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


# --- the shared record of each ingester's state ------------------------------------------------------


def ingester_name(settings: Settings) -> str:
    """``host:inbox``, the key of this ingester's row."""
    return f"{socket.gethostname()}:{settings.inbox.expanduser().resolve()}"


def record_ingest_status(settings: Settings, name: str, watermark: DiskWatermark) -> None:
    """Write this ingester's watermark state (insert or update its row)."""
    reading = watermark.reading
    row = {
        "name": name,
        "paused": watermark.is_paused,
        "paused_since": watermark.paused_since,
        "free_bytes": None if reading is None else reading.free_bytes,
        "disk_path": None if reading is None else str(reading.path),
        "message": watermark.message(),
        "updated_at": datetime.now(UTC),
    }
    with session_scope(settings) as session:
        insert_or_update(session, IngestStatus, [row], key=("name",))


def forget_ingest_status(settings: Settings, name: str) -> None:
    """Remove this ingester's row (it stopped)."""
    with session_scope(settings) as session:
        session.execute(delete(IngestStatus).where(IngestStatus.name == name))


def ingest_status(session: Session, fresh_seconds: float, now: datetime | None = None) -> dict[str, Any]:
    """The ingesters' watermark states for ``status``: ``paused`` if any ingester seen lately pauses.

    An ingester whose row is older than ``fresh_seconds`` is listed as ``stale`` (it stopped
    without saying so, or cannot reach the database) and does not count.
    """
    now = now or datetime.now(UTC)
    ingesters = []
    for row in session.scalars(select(IngestStatus).order_by(IngestStatus.name)):
        age = (now - _aware(row.updated_at)).total_seconds()
        ingesters.append({
            "name": row.name,
            "paused": row.paused,
            "paused_since": None if row.paused_since is None else _aware(row.paused_since).isoformat(),
            "free_mb": None if row.free_bytes is None else round(row.free_bytes / MIB, 1),
            "disk_path": row.disk_path,
            "message": row.message,
            "age_seconds": round(age, 1),
            "stale": age > fresh_seconds,
        })
    return {"paused": any(item["paused"] and not item["stale"] for item in ingesters), "ingesters": ingesters}


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes; every timestamp this project writes is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
