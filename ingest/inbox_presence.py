"""Notices the inbox folder going away and coming back (renamed, unmounted, replaced) and re-arms the watcher.

An inotify watch follows the folder it was set on, wherever that folder is renamed to, so a
watch set before ``mv inbox inbox.old; mv inbox.old inbox`` (or an NFS remount) no longer says
anything reliable about the path ``inbox``. The ingest loop asks :meth:`InboxPresence.present`
about once a second: while the folder is gone nothing is taken from it and nothing recreates it
(a folder moved back would land inside the new one); once a folder is there again, the observer
is started afresh on it and the folder is scanned at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from covid_cxr.safe_output import printable
from ingest.watcher import InboxWatcher

log = logging.getLogger(__name__)

#: Seconds between two looks at the inbox folder.
CHECK_EVERY_SECONDS = 1.0

Identity = tuple[int, int]  # (st_dev, st_ino)


class InboxPresence:
    """Tracks which folder is the inbox; re-arms ``watcher`` when it changes or comes back."""

    def __init__(self, watcher: InboxWatcher, *, check_every: float = CHECK_EVERY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.watcher = watcher
        self._check_every = check_every
        self._clock = clock
        self._next_check = 0.0
        self._identity: Identity | None = None
        self.rearmed = 0

    def start(self) -> None:
        """Remember the folder the watcher was started on (call right after starting it)."""
        self._identity = _identity(self.watcher.inbox)
        self._next_check = self._clock() + self._check_every

    def present(self) -> bool:
        """Whether the inbox folder is there; re-arms the watcher when it came back or is another folder now."""
        now = self._clock()
        if now < self._next_check:
            return self._identity is not None
        self._next_check = now + self._check_every
        identity = _identity(self.watcher.inbox)
        if identity == self._identity:
            return identity is not None
        where = printable(str(self.watcher.inbox))
        if identity is None:
            log.warning("the inbox %s is gone (renamed or unmounted?): waiting for it to come back; files already "
                        "recorded are safe, the others are taken once it is back", where)
            self.watcher.stop()
        else:
            log.warning("the inbox %s is %s: watching it again", where,
                        "back" if self._identity is None else "another folder now")
            self.watcher.stop()
            self.watcher.start()
            found = self.watcher.scan()
            self.rearmed += 1
            log.info("inbox %s re-armed: %d file(s) found", where, found)
        self._identity = identity
        return identity is not None


def _identity(folder: os.PathLike[str] | str) -> Identity | None:
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino
