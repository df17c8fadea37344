"""Inbox files, opened once and safely; and where each goes once recorded: archive, keep, delete or quarantine.

Anyone on the hospital network may write the inbox, so an entry is never trusted: a symbolic link
is never followed, only a regular file is read (from the one handle that was checked), a file that
changes while it is read is read again later, and nothing is moved that is not the file that was read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings

Action = Literal["archive", "keep", "delete", "quarantine"]

#: Suffix of the marker written beside every quarantined file.
REASON_SUFFIX = ".reason.json"
#: Longest file name (bytes) the common Linux file systems take.
NAME_MAX = 255
#: Bytes read at a time from an inbox file.
_CHUNK = 1 << 20


class InboxEntryError(Exception):
    """An inbox entry that cannot be taken as it is; ``cause`` is its stable reason code.

    It is listed as stuck (``status``) and tried again later, with a growing delay.
    """

    def __init__(self, cause: Reason, message: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.message = message

    def __reduce__(self) -> tuple[type[InboxEntryError], tuple[Reason, str]]:
        return type(self), (self.cause, self.message)  # a decode process that read the entry sends it back


class FileChanged(Exception):
    """The file changed while it was read, or before it was moved: its writer is not done yet."""


@dataclass(frozen=True)
class InboxFile:
    """The bytes of one regular inbox file and the identity (device, inode, size, mtime) they were read from."""

    data: bytes
    identity: tuple[int, int, int, int]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _describe_mode(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def entry_error(exc: OSError) -> InboxEntryError | None:
    """The stable cause of an ``OSError`` met while opening an inbox entry, if it is the entry's own."""
    if exc.errno == errno.ELOOP:
        return InboxEntryError(Reason.NOT_A_REGULAR_FILE, "a symbolic link: links are never followed")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return InboxEntryError(Reason.UNREADABLE, "permission denied: the service's user cannot read it")
    if exc.errno == errno.ENAMETOOLONG:
        return InboxEntryError(Reason.NAME_TOO_LONG, "its path is longer than the file system allows")
    return None


def read_inbox_file(path: Path) -> InboxFile:
    """Read a regular file without following links, from the one handle whose type was checked.

    Raises
    ------
    FileNotFoundError
        It is gone (taken by another process, or deleted).
    InboxEntryError
        It is not a regular file, cannot be read, or its name is too long.
    FileChanged
        Its size or mtime moved while it was read.
    """
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):  # decided before opening: opening a device or a pipe can act
            raise InboxEntryError(Reason.NOT_A_REGULAR_FILE, f"a {_describe_mode(info.st_mode)}, not a regular file; "
                                                        "left where it is, its target untouched")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        problem = entry_error(exc)
        if problem is None:
            raise
        raise problem from exc
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or (before.st_dev, before.st_ino) != (info.st_dev, info.st_ino):
            raise FileChanged("replaced between its check and its opening")
        chunks = []
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
        raise FileChanged("written to while it was read")
    return InboxFile(data, identity_of(after))


Identity = tuple[int, int, int, int]


def identity_of(info: os.stat_result) -> Identity:
    """What makes a file the very file that was seen: device, inode, size and mtime."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def read_claimed_file(path: Path, identity: Identity) -> InboxFile:
    """:func:`read_inbox_file`, of a file that must still be the one of ``identity`` (as it was when claimed);
    raises ``FileChanged`` otherwise."""
    inbox_file = read_inbox_file(path)
    if inbox_file.identity != identity:
        raise FileChanged("replaced or written to since it was claimed")
    return inbox_file


def is_unchanged(path: Path, identity: tuple[int, int, int, int]) -> bool:
    """Whether ``path`` is still the very regular file (same inode, size and mtime) that was read."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and identity_of(info) == identity

#: Mode of the files the service stores (archived and quarantined DICOMs hold PHI).
PRIVATE_FILE_MODE = 0o600

# Hard links are the atomic "create only if absent" move; these errors mean the
# file system cannot link across the two folders, so we copy instead.
NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


@dataclass(frozen=True)
class Disposal:
    """What to do with one inbox file, decided (and recorded in the database) before it is done.

    ``destination`` is the planned final path: a free name under the archive or quarantine,
    the inbox path itself for ``keep`` and for a ``delete`` not yet carried out.
    """

    action: Action
    destination: Path


def relative_name(path: Path, inbox: Path) -> str:
    """``path`` relative to the inbox, with forward slashes (what the database stores as ``file_name``).

    The entry itself is not resolved (it may be a link pointing anywhere), and bytes that are not
    UTF-8 are written as ``\\xNN`` escapes, so any name the file system holds can be stored.
    """
    rel = (path.parent.resolve() / path.name).relative_to(inbox.resolve()).as_posix()
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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


def carry_out(disposal: Disposal, source: Path, reason: dict[str, Any] | None = None, *,
              data: bytes | None = None) -> Path | None:
    """Do ``disposal`` on ``source``; returns where the file is now (``None`` once deleted).

    The returned path differs from ``disposal.destination`` only when another file took that
    name in between (the caller then records the new path). A quarantined file gets
    ``<name>.reason.json`` beside it with ``reason``; given the ``data`` that was judged, it is
    written from them as a new file and the inbox entry removed, so that a writer still holding
    the old inode can never change what lies in quarantine.
    """
    if disposal.action == "keep":
        return source
    if disposal.action == "delete":
        source.unlink(missing_ok=True)
        return None
    if disposal.action == "quarantine" and data is not None:
        final = write_no_clobber(data, disposal.destination)
        source.unlink(missing_ok=True)
    else:
        final = move_no_clobber(source, disposal.destination)
    if disposal.action == "quarantine":
        write_reason(final, reason or {})
    return final


def write_no_clobber(data: bytes, destination: Path) -> Path:
    """Write ``data`` to ``destination`` (or the next free name) as a new private file; returns its path."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = free_name(destination)
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return candidate


def free_name(destination: Path) -> Path:
    """``destination``, or ``name~1.ext``, ``name~2.ext``, ... : the first name whose file (and marker) is absent."""
    candidate, counter = destination, 0
    while candidate.exists() or reason_path(candidate).exists():
        counter += 1
        candidate = destination.with_name(_numbered(destination.name, counter))
    return candidate


def _numbered(name: str, counter: int) -> str:
    stem, dot, ext = name.rpartition(".")
    # Only a real extension is kept last: DICOM files are often named by UID ("1.2.840.5").
    if dot and stem and ext.isalpha() and len(ext) <= 5:
        return fit_name(stem, f"~{counter}.{ext}")
    return fit_name(name, f"~{counter}")


def fit_name(name: str, suffix: str) -> str:
    """``name + suffix``, with ``name`` shortened (and a hash of it added) when that would pass NAME_MAX bytes."""
    if len(os.fsencode(name + suffix)) <= NAME_MAX:
        return name + suffix
    tag = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    room = NAME_MAX - len(os.fsencode(tag + suffix))
    short = name
    while len(os.fsencode(short)) > room:
        short = short[:-1]
    return short + tag + suffix


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
            os.link(source, candidate, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in NO_LINK_ERRNOS:
                raise
            return _copy_then_remove(source, destination)
        source.unlink()
        os.chmod(candidate, PRIVATE_FILE_MODE, follow_symlinks=False)
        return candidate


def _copy_then_remove(source: Path, destination: Path) -> Path:
    temporary = destination.with_name(f".{uuid.uuid4().hex}.tmp")
    shutil.copy2(source, temporary, follow_symlinks=False)
    os.chmod(temporary, PRIVATE_FILE_MODE)
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
                if exc.errno not in NO_LINK_ERRNOS:
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
    target = reason_path(quarantined)
    temporary = target.with_name(f".{uuid.uuid4().hex}.reason.tmp")
    temporary.write_text(json.dumps(reason, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temporary, target)
    return target


def read_reason(quarantined: Path) -> dict[str, Any]:
    """The reason marker written beside a quarantined file; ``ValueError`` when it is not a JSON object."""
    path = reason_path(quarantined)
    reason = json.loads(path.read_text())
    if not isinstance(reason, dict):
        raise ValueError(f"{path} is not a reason marker (a JSON object)")
    return reason


def reason_path(quarantined: Path) -> Path:
    """Where the reason marker of a quarantined file lies (its name shortened if it would be too long)."""
    return quarantined.with_name(fit_name(quarantined.name, REASON_SUFFIX))
