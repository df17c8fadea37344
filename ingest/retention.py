"""Retention: delete old archived and quarantined files and drop old normalized images, keeping every row.

What goes, for instances recorded before a cutoff and in a final state:

* ``archive``: the file in the archive folder; the row's ``stored_path`` becomes null and
  ``purged_at`` says when.
* ``quarantine``: the file in the quarantine folder and its ``.reason.json`` marker; the same marks.
* ``images``: the normalized PNG of a *predicted* instance (its mean and standard deviation stay,
  for drift); ``normalized_images.png`` becomes null and its ``purged_at`` is set.

Predictions, study results, labels and evaluation reports are never touched. Nothing outside the
configured archive and quarantine folders is ever deleted: a recorded path that leads elsewhere (a
symbolic link out of the folder, a file kept in the inbox) is refused and reported, not followed.
A file is deleted before its row is marked, so an interrupted purge leaves a row pointing at a
missing file (finished by the next purge), never an unrecorded file.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from covid_cxr.settings import Settings
from db.models import Instance, InstanceState, NormalizedImage
from db.session import session_scope
from ingest.inbox import REASON_SUFFIX

log = logging.getLogger(__name__)

#: Rows handled per transaction.
CHUNK = 500
#: States whose files may go: nothing still waiting for a prediction is touched.
FINAL_STATES = tuple(state.value for state in InstanceState if state.terminal)


@dataclass
class FolderPurge:
    """What happened (or would happen, in a dry run) in one folder."""

    files: int = 0
    bytes: int = 0
    already_gone: int = 0
    #: Recorded paths that are not regular files inside the folder: left alone.
    refused: list[str] = field(default_factory=list)


@dataclass
class PurgeReport:
    cutoff: datetime
    dry_run: bool
    archive: FolderPurge | None = None
    quarantine: FolderPurge | None = None
    images: int = 0
    image_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(), "dry_run": self.dry_run,
            "archive": None if self.archive is None else self.archive.__dict__,
            "quarantine": None if self.quarantine is None else self.quarantine.__dict__,
            "images": self.images, "image_bytes": self.image_bytes,
        }


def purge(settings: Settings, *, older_than: timedelta, archive: bool = False, quarantine: bool = False,
          images: bool = False, dry_run: bool = False, now: datetime | None = None) -> PurgeReport:
    """Purge what was recorded more than ``older_than`` ago (see the module docstring); ``dry_run`` only counts."""
    now = now or datetime.now(UTC)
    report = PurgeReport(cutoff=now - older_than, dry_run=dry_run)
    if archive:
        report.archive = _purge_files(settings, settings.archive, report.cutoff, now, dry_run, markers=False)
    if quarantine:
        report.quarantine = _purge_files(settings, settings.quarantine, report.cutoff, now, dry_run, markers=True)
    if images:
        report.images, report.image_bytes = _purge_images(settings, report.cutoff, now, dry_run)
    return report


def _purge_files(settings: Settings, folder: Path, cutoff: datetime, now: datetime, dry_run: bool, *,
                 markers: bool) -> FolderPurge:
    result = FolderPurge()
    root = Path(os.path.realpath(folder.expanduser()))
    last_id = 0
    while True:
        with session_scope(settings) as session:
            rows = session.execute(
                select(Instance.id, Instance.stored_path)
                .where(Instance.id > last_id, Instance.stored_path.is_not(None), Instance.purged_at.is_(None),
                       Instance.created_at < cutoff, Instance.state.in_(FINAL_STATES))
                .order_by(Instance.id).limit(CHUNK)
            ).all()
        if not rows:
            return result
        last_id = rows[-1].id
        purged: list[int] = []
        for row in rows:
            path = Path(row.stored_path)
            if not _inside(path, root):
                continue  # another folder's file (the archive's, the quarantine's, a kept one in the inbox)
            size = _regular_file_size(path, root)
            if size is None:
                result.refused.append(str(path))
                continue
            if size < 0:
                result.already_gone += 1
            else:
                result.files += 1
                result.bytes += size
                if not dry_run:
                    path.unlink(missing_ok=True)
                    if markers:
                        path.with_name(path.name + REASON_SUFFIX).unlink(missing_ok=True)
            purged.append(row.id)
        if purged and not dry_run:
            with session_scope(settings) as session:
                session.execute(update(Instance).where(Instance.id.in_(purged))
                                .values(stored_path=None, purged_at=now))
            log.info("purged %d file(s) from %s", len(purged), root)


def _purge_images(settings: Settings, cutoff: datetime, now: datetime, dry_run: bool) -> tuple[int, int]:
    old_predicted = (
        select(Instance.id)
        .where(Instance.state == InstanceState.predicted, Instance.created_at < cutoff)
    )
    selected = (NormalizedImage.instance_id.in_(old_predicted), NormalizedImage.png.is_not(None))
    with session_scope(settings) as session:
        count, size = session.execute(
            select(func.count(), func.coalesce(func.sum(func.length(NormalizedImage.png)), 0)).where(*selected)
        ).one()
        if not dry_run and count:
            session.execute(update(NormalizedImage).where(*selected).values(png=None, purged_at=now))
    if count and not dry_run:
        log.info("dropped %d normalized image(s) of predicted instances", count)
    return int(count), int(size)


def _inside(path: Path, root: Path) -> bool:
    """Whether the recorded ``path`` names something under ``root`` (the folder's real path)."""
    absolute = Path(os.path.abspath(path))
    return absolute != root and absolute.is_relative_to(root)


def _regular_file_size(path: Path, root: Path) -> int | None:
    """The size of ``path`` if it is a regular file really inside ``root``; -1 if it is gone; ``None``: not ours."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return -1
    real = Path(os.path.realpath(path))
    if not stat.S_ISREG(info.st_mode) or not real.is_relative_to(root) or real == root:
        return None
    return info.st_size
