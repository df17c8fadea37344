"""Where a file goes once it is recorded: archive, keep or delete an accepted one; quarantine a rejected one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from covid_cxr.settings import Settings

Action = Literal["archive", "keep", "delete", "quarantine"]

#: Suffix of the marker written beside every quarantined file.
REASON_SUFFIX = ".reason.json"

# Hard links are the atomic "create only if absent" move; these errors mean the
# file system cannot link across the two folders, so we copy instead.
_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


@dataclass(frozen=True)
class Disposal:
    """What to do with one inbox file, decided (and recorded in the database) before it is done.

    ``destination`` is the planned final path: a free name under the archive or quarantine,
    the inbox path itself for ``keep`` and for a ``delete`` not yet carried out.
    """

    action: Action
    destination: Path


def relative_name(path: Path, inbox: Path) -> str:
    """``path`` relative to the inbox, with forward slashes (what the database stores as ``file_name``)."""
    return path.resolve().relative_to(inbox.resolve()).as_posix()


def plan_disposal(settings: Settings, path: Path, rel_name: str, *, accepted: bool) -> Disposal:
    """Choose what happens to ``path``: quarantine when rejected, otherwise ``settings.after_ingest``.

    Archive and quarantine keep the file's sub-folder under the inbox and pick a name not
    yet taken, so nothing already there is overwritten.
    """
    if not accepted:
        return Disposal("quarantine", free_name(settings.quarantine.resolve() / rel_name))
    if settings.after_ingest == "archive":
        return Disposal("archive", free_name(settings.archive.resolve() / rel_name))
    return Disposal(settings.after_ingest, path.resolve())


def carry_out(disposal: Disposal, source: Path, reason: dict[str, Any] | None = None) -> Path | None:
    """Do ``disposal`` on ``source``; returns where the file is now (``None`` once deleted).

    The returned path differs from ``disposal.destination`` only when another file took that
    name in between (the caller then records the new path). A quarantined file gets
    ``<name>.reason.json`` beside it with ``reason``.
    """
    if disposal.action == "keep":
        return source
    if disposal.action == "delete":
        source.unlink(missing_ok=True)
        return None
    final = move_no_clobber(source, disposal.destination)
    if disposal.action == "quarantine":
        write_reason(final, reason or {})
    return final


def free_name(destination: Path) -> Path:
    """``destination``, or ``name~1.ext``, ``name~2.ext``, ... : the first name whose file (and marker) is absent."""
    candidate, counter = destination, 0
    while candidate.exists() or _reason_path(candidate).exists():
        counter += 1
        candidate = destination.with_name(_numbered(destination.name, counter))
    return candidate


def _numbered(name: str, counter: int) -> str:
    stem, dot, ext = name.rpartition(".")
    # Only a real extension is kept last: DICOM files are often named by UID ("1.2.840.5").
    if dot and stem and ext.isalpha() and len(ext) <= 5:
        return f"{stem}~{counter}.{ext}"
    return f"{name}~{counter}"


def move_no_clobber(source: Path, destination: Path) -> Path:
    """Move ``source`` to ``destination`` (or the next free name) without ever overwriting a file.

    Same file system: a hard link (fails if the name exists) then unlink of the source, so a
    crash in between leaves two names of one file, never zero. Across file systems: copy to a
    hidden temporary name beside the destination, fsync, link it into place, then remove the
    source. Returns the final path.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = free_name(destination)
        try:
            os.link(source, candidate)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            return _copy_then_remove(source, destination)
        source.unlink()
        return candidate


def _copy_then_remove(source: Path, destination: Path) -> Path:
    temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.tmp")
    shutil.copy2(source, temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    try:
        while True:
            candidate = free_name(destination)
            try:
                os.link(temporary, candidate)
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in _NO_LINK_ERRNOS:
                    raise
                # No hard links at all on this file system: rename is the best left (a name
                # taken between free_name() and here would be replaced, so check once more).
                if candidate.exists():
                    continue
                os.rename(temporary, candidate)
            break
    finally:
        temporary.unlink(missing_ok=True)
    source.unlink()
    return candidate


def write_reason(quarantined: Path, reason: dict[str, Any]) -> Path:
    """Write ``<quarantined>.reason.json`` atomically (temporary file, then rename)."""
    target = _reason_path(quarantined)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(reason, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temporary, target)
    return target


def read_reason(quarantined: Path) -> dict[str, Any]:
    """The reason marker written beside a quarantined file; ``ValueError`` when it is not a JSON object."""
    path = _reason_path(quarantined)
    reason = json.loads(path.read_text())
    if not isinstance(reason, dict):
        raise ValueError(f"{path} is not a reason marker (a JSON object)")
    return reason


def _reason_path(path: Path) -> Path:
    return path.with_name(path.name + REASON_SUFFIX)
