"""Finds complete files in the inbox: filesystem events as a hint, full scans as the guarantee."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)

#: Names that are still being written by convention (rsync, browsers, DICOM routers).
TEMPORARY_SUFFIXES = (".part", ".tmp")

Signature = tuple[int, int]  # (size, mtime_ns)

#: The events the handler acts on. Asking inotify for these alone keeps out the open and close-without-write
#: events of every read of a claimed file (a decode process's, a hash's), and the parent folder's "modified"
#: echo of each change: events the handler ignores, but which watchdog's thread would otherwise decode and
#: dispatch, on the cores the decode processes use.
HANDLED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileMovedEvent, DirMovedEvent, FileDeletedEvent,
    DirDeletedEvent, FileClosedEvent,
]


def is_ignored_name(rel_parts: Iterable[str]) -> bool:
    """True for dot-files, files inside dot-folders, and temporary names (``*.part``, ``*.tmp``)."""
    parts = list(rel_parts)
    if any(part.startswith(".") for part in parts):
        return True
    return bool(parts) and parts[-1].lower().endswith(TEMPORARY_SUFFIXES)


@dataclass
class _Candidate:
    signature: Signature
    stable_since: float  # monotonic time the signature was last seen to change
    atomic: bool  # renamed into place: complete as soon as it appears
    not_before: float = 0.0  # monotonic time before which it is not handed out (a retry)


class InboxWatcher:
    """Tracks inbox files until they are complete, then hands each out once.

    A file is *ready* when it was renamed into place inside the inbox (e.g. ``x.dcm.part`` ->
    ``x.dcm``: rename is atomic), or when its size and mtime have not changed for
    ``settle_seconds``: watched for that long here, or, on a local disk, stamped by its own
    mtime as unmodified for that long (files moved in from elsewhere, files dropped while the
    service was down). The mtime shortcut is off with the polling observer because network
    shares stamp mtimes with another machine's clock.

    Events from watchdog only make a file known sooner; :meth:`scan` (at start-up and
    periodically) finds everything the events missed, so a lost event delays a file by at
    most one scan.

    A file handed out by :meth:`take_ready` is *claimed* until :meth:`release`, so it is never
    processed twice concurrently. A released file that is still in the inbox (``keep``) is
    remembered by signature and not handed out again until it changes.
    """

    def __init__(
        self,
        inbox: Path,
        *,
        settle_seconds: float,
        ignore_dirs: Iterable[Path] = (),
        polling: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox.resolve()
        self.settle_seconds = settle_seconds
        self.ignore_dirs = tuple(p.resolve() for p in ignore_dirs)
        self.polling = polling
        self._clock = clock
        self._wall_clock = wall_clock
        self._trust_mtime = not polling
        self._lock = threading.Lock()
        self._candidates: dict[Path, _Candidate] = {}
        self._claimed: set[Path] = set()
        self._done: dict[Path, Signature] = {}
        self._wakeup = threading.Event()
        self._observer: BaseObserver | None = None

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the observer thread (inotify, or polling for network shares)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        try:
            self._observer = self._start_observer(polling=self.polling)
        except OSError as exc:  # e.g. the inotify watch limit on a huge tree: events are only a hint
            log.warning("inotify unavailable for %s (%s); polling the inbox instead", self.inbox, exc)
            self._observer = self._start_observer(polling=True)

    def _start_observer(self, *, polling: bool) -> BaseObserver:
        observer = PollingObserver(timeout=1.0) if polling else Observer()
        observer.schedule(_Handler(self), str(self.inbox), recursive=True, event_filter=HANDLED_EVENTS)
        observer.daemon = True
        observer.start()
        return observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
        self._wakeup.set()

    def __enter__(self) -> InboxWatcher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- discovery ----------------------------------------------------------------------------
    def scan(self) -> int:
        """Walk the whole inbox; returns how many files became newly known."""
        found = 0
        seen: set[Path] = set()
        for path in self._walk(self.inbox):
            seen.add(path)
            found += self._note(path, atomic=False)
        with self._lock:
            # Forget files that left the inbox, so a new file under an old name is new again.
            for path in [p for p in self._done if p not in seen]:
                del self._done[path]
            for path in [p for p in self._candidates if p not in seen and p not in self._claimed]:
                del self._candidates[path]
        if found:
            self._wakeup.set()
        return found

    def notice(self, path: Path, *, atomic: bool = False) -> None:
        """Hint that ``path`` (a file or a folder) appeared or changed."""
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            if not self._ignored(path):
                for child in self._walk(path):
                    self._note(child, atomic=atomic)
        else:
            self._note(path, atomic=atomic)
        self._wakeup.set()

    def forget(self, path: Path) -> None:
        with self._lock:
            self._candidates.pop(Path(path), None)

    def _walk(self, top: Path) -> Iterator[Path]:
        """Every entry below ``top`` that is not a folder, plus the folders that cannot be listed.

        A link to a folder is an entry of its own (never followed), and so is a folder the
        service may not read or whose path is too long to open: each is handed out, so that the
        service lists it as stuck with its cause rather than skipping it in silence.
        """
        unlistable: list[Path] = []

        def note_error(exc: OSError) -> None:
            if exc.filename is not None and Path(exc.filename) != top:
                unlistable.append(Path(os.fsdecode(exc.filename)))

        for root, dirs, files in os.walk(top, onerror=note_error):
            root_path = Path(root)
            links = [d for d in dirs if _is_link(root_path / d)]
            dirs[:] = [d for d in dirs if d not in links and not self._ignored(root_path / d)]
            for name in [*files, *links]:
                path = root_path / name
                if not self._ignored(path):
                    yield path
            yield from self._drain(unlistable)
        yield from self._drain(unlistable)

    def _drain(self, paths: list[Path]) -> Iterator[Path]:
        while paths:
            path = paths.pop()
            if not self._ignored(path):
                yield path

    def _ignored(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self.inbox)
        except ValueError:
            return True
        if is_ignored_name(rel.parts):
            return True
        return any(path == d or d in path.parents for d in self.ignore_dirs)

    def _note(self, path: Path, *, atomic: bool) -> int:
        if self._ignored(path):
            return 0
        signature = _signature(path)
        if signature is None:
            return 0
        now = self._clock()
        with self._lock:
            if path in self._claimed or self._done.get(path) == signature:
                return 0
            self._done.pop(path, None)
            candidate = self._candidates.get(path)
            if candidate is None:
                self._candidates[path] = _Candidate(signature, now, atomic)
                return 1
            if atomic:
                candidate.atomic = True
            return 0

    # --- hand-out -----------------------------------------------------------------------------
    def take_ready(self) -> list[Path]:
        """Claim and return the files that are complete now (oldest first)."""
        now, wall_now = self._clock(), self._wall_clock()
        ready: list[Path] = []
        with self._lock:
            items = sorted(self._candidates.items(), key=lambda item: item[1].stable_since)
        for path, candidate in items:
            signature = _signature(path)
            with self._lock:
                if (path in self._claimed or self._candidates.get(path) is not candidate
                        or now < candidate.not_before):
                    continue
                if signature is None:
                    del self._candidates[path]
                    continue
                if signature != candidate.signature:
                    candidate.signature, candidate.stable_since, candidate.atomic = signature, now, False
                    continue
                unmodified_for = wall_now - signature[1] / 1e9 if self._trust_mtime else 0.0
                if (candidate.atomic or now - candidate.stable_since >= self.settle_seconds
                        or unmodified_for >= self.settle_seconds):
                    del self._candidates[path]
                    self._claimed.add(path)
                    ready.append(path)
        return ready

    def release(self, path: Path) -> None:
        """End the claim on ``path``; if it is still there, remember it so it is not handed out again unchanged."""
        path = Path(path)
        signature = _signature(path)
        with self._lock:
            self._claimed.discard(path)
            if signature is not None:
                self._done[path] = signature

    def retry_later(self, path: Path, delay: float = 0.0) -> None:
        """End the claim on ``path`` without remembering it: it is offered again after ``delay`` seconds."""
        path = Path(path)
        with self._lock:
            self._claimed.discard(path)
        self._note(path, atomic=False)
        with self._lock:
            candidate = self._candidates.get(path)
            if candidate is not None:
                candidate.not_before = self._clock() + delay

    def seconds_until_next_check(self) -> float | None:
        """How long until the earliest waiting file could be ready; ``None`` if none waits."""
        with self._lock:
            if not self._candidates:
                return None
            earliest = min(max(c.stable_since + self.settle_seconds, c.not_before)
                           for c in self._candidates.values())
        return max(0.0, earliest - self._clock())

    def wait(self, timeout: float) -> None:
        """Sleep until an event arrives or ``timeout`` seconds pass."""
        self._wakeup.wait(timeout)
        self._wakeup.clear()

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def waiting(self) -> int:
        """Files known but not complete yet."""
        with self._lock:
            return len(self._candidates)


def _is_link(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:
        return False


def _signature(path: Path) -> Signature | None:
    """Size and mtime of the entry itself (a link is not followed); ``None`` once it is gone.

    Entries that are not regular files, and entries that cannot even be looked at (a path past
    PATH_MAX, say), get a signature too: they are handed out like files, so that the service
    records them as stuck with their cause instead of skipping them in silence.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return -1, -(exc.errno or 1)
    if stat.S_ISDIR(info.st_mode) and os.access(path, os.R_OK | os.X_OK):
        return None  # a folder is walked, not handed out (unless it cannot be read)
    return info.st_size, info.st_mtime_ns


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into hints; never decides completeness itself."""

    def __init__(self, watcher: InboxWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            source = Path(os.fsdecode(event.src_path))
            if event.event_type == "moved":
                self.watcher.forget(source)
                # Renamed into place (a file, or a whole folder of files): complete already.
                self.watcher.notice(Path(os.fsdecode(event.dest_path)), atomic=True)
            elif event.event_type == "deleted":
                self.watcher.forget(source)
            elif event.is_directory:
                # A new folder may have received files before its watch was added.
                if event.event_type == "created":
                    self.watcher.notice(source)
            elif event.event_type in {"created", "modified", "closed"}:
                self.watcher.notice(source)
        except Exception:  # an event is only a hint: the next scan covers anything missed here
            log.exception("ignoring inbox event %r", event)
