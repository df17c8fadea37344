"""Several ingesters on one inbox: each file is claimed by exactly one, by an atomic rename into its claim folder.

The protocol (docs: Operate, "Several ingesters on one inbox"):

* Every ingester owns ``INBOX/.claims/<host>-<pid>-<machine>-<random>/``: its host name, process
  id, a hash of the kernel boot and process namespace it runs in, and a random part. It
  touches the folder (its mtime) every ``lease / 4`` seconds, from a thread of its own, as its
  heartbeat. The folder holds nothing but claimed files and exists only while it holds some
  (``.claims`` likewise), so an idle inbox shows nothing of the service's own.
* To take an inbox file, an ingester renames it to the same relative path under its own
  folder. A rename within one file system is atomic, on a local disk and on an NFS or SMB
  share alike: of several ingesters exactly one succeeds, the others find the file gone and
  move on. Nothing else is shared and no clock is compared.
* A claimed file leaves the claim folder when it is disposed of (archive, quarantine,
  delete) or goes back to its inbox name (``keep``, a file still being written, a failure
  to be retried).
* An ingester is dead when its heartbeat file has not changed for ``lease`` seconds, as
  timed by the observer's own clock (so clocks on different hosts never meet), or at once
  when it ran on the observer's host, kernel boot and process namespace and its process is
  gone. Any other ingester then adopts its files, one rename each (so several survivors
  share them), and removes its folder. A file whose row was committed before its owner
  died is recognised by its name and sha256 and only its disposal is finished
  (:func:`ingest.recorder.find_recorded_file`).
* On a clean stop an ingester moves what it still holds back to the inbox and removes its folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.inbox import NO_LINK_ERRNOS, free_name, relative_name

log = logging.getLogger(__name__)

#: Folder under the inbox that holds one claim folder per running ingester (hidden: never ingested).
CLAIMS_FOLDER = ".claims"


@dataclass(frozen=True)
class Claim:
    """One file held by this ingester: where it is now, and the inbox name it had (and is recorded under)."""

    path: Path
    relative: Path
    inbox: Path

    @property
    def inbox_path(self) -> Path:
        return self.inbox / self.relative

    @functools.cached_property
    def rel_name(self) -> str:
        """The name the database stores (``file_name``): the inbox-relative path, escaped as ingest escapes it.

        Worked out once per claim: it resolves the inbox and the file's folder, which the loop would
        otherwise repeat several times for every file."""
        return relative_name(self.inbox_path, self.inbox)


@dataclass
class _Observed:
    signature: tuple[int, int] | None
    since: float


class ClaimFolder:
    """This ingester's claim folder and its side of the protocol; :meth:`open` before use, :meth:`close` after.

    ``lease_seconds``: how long another ingester's heartbeat may stand still before it is
    taken as dead. ``clock``: the monotonic clock leases are timed with.
    """

    def __init__(self, inbox: Path, lease_seconds: float, *, clock: Callable[[], float] = time.monotonic,
                 ingester_id: str | None = None) -> None:
        self.inbox = inbox.resolve()
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.ingester_id = ingester_id or (f"{socket.gethostname()}-{os.getpid()}-{machine_hash()}-"
                                           f"{secrets.token_hex(3)}")
        self.root = self.inbox / CLAIMS_FOLDER
        self.folder = self.root / self.ingester_id
        self._observed: dict[str, _Observed] = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------
    def open(self) -> None:
        """Start the heartbeat. The folder exists only while it holds files (the first claim creates it)."""
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
        self._heartbeat.start()
        log.info("claiming inbox files into %s (lease %.0fs)", self.folder, self.lease_seconds)

    def close(self) -> None:
        """Stop the heartbeat, move every file still held back to the inbox and remove the folder."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        returned = 0
        for claim in list(self.held()):
            try:
                self.release(claim)
                returned += 1
            except OSError:
                log.warning("could not move %s back to the inbox; it stays in %s for another ingester to adopt",
                            claim.relative, self.folder, exc_info=True)
        if returned:
            log.info("moved %d claimed file(s) back to the inbox", returned)
        _remove_folder(self.folder)
        _remove_if_empty(self.root)

    def _beat(self) -> None:
        interval = max(0.05, self.lease_seconds / 4)
        while not self._stop.wait(interval):
            try:
                os.utime(self.folder)
            except FileNotFoundError:  # it holds nothing now, so there is nothing to keep alive
                continue
            except OSError:  # the share is away
                log.warning("cannot refresh the heartbeat of %s", self.folder, exc_info=True)

    # --- claiming -----------------------------------------------------------------------------
    def claim(self, path: Path) -> Claim | None:
        """Rename the inbox file ``path`` into this folder; ``None`` when another ingester was faster (or it is gone).

        Raises ``OSError`` for problems of the entry itself (e.g. a name too long); a file of
        the same relative path that this ingester already holds is left for later
        (``FileExistsError``).
        """
        relative = Path(os.path.relpath(path.parent.resolve() / path.name, self.inbox))
        return self._take(path, relative)

    def _take(self, source: Path, relative: Path) -> Claim | None:
        target = self.folder / relative
        if os.path.lexists(target):
            raise FileExistsError(f"{relative} is already held by this ingester")
        try:
            before = os.lstat(source)
        except FileNotFoundError:
            return None
        for _ in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(source, target)
            except FileNotFoundError:
                # Another ingester renamed it first, or (NFS) our own rename was done and its retransmission
                # failed: the file is ours exactly when it now lies under our name. A source still in place
                # means the folder went (another ingester removed an empty ``.claims``): make it again.
                if _same_entry(target, before):
                    break
                if os.path.lexists(source):
                    continue
                self.done(Claim(target, relative, self.inbox))
                return None
            break
        else:
            raise FileNotFoundError(f"could not create the claim folder for {relative}")
        return Claim(target, relative, self.inbox)

    def release(self, claim: Claim) -> Path:
        """Give ``claim`` back to the inbox under its name (or the next free one); returns where it is now.

        Safe in any thread; :meth:`done` (which removes the folders it leaves empty) is for the claiming one.
        """
        destination = claim.inbox_path
        destination.parent.mkdir(parents=True, exist_ok=True)
        while True:
            candidate = free_name(destination)
            try:
                os.link(claim.path, candidate, follow_symlinks=False)
            except FileExistsError:
                continue
            except OSError as exc:  # no hard links on this share: a rename, once the name is seen free
                if exc.errno not in NO_LINK_ERRNOS or os.path.lexists(candidate):
                    raise
                os.rename(claim.path, candidate)
                break
            claim.path.unlink()
            break
        return candidate

    def done(self, claim: Claim) -> None:
        """Forget ``claim`` after its file left the claim folder: remove the folders it leaves empty (this
        ingester's own and ``.claims`` too), so that an idle inbox holds nothing of the service's own."""
        _prune_empty(claim.path.parent, self.root)
        _remove_if_empty(self.root)

    def held(self) -> Iterator[Claim]:
        """The files this ingester holds now."""
        yield from _files_in(self.folder, self.inbox)

    # --- dead ingesters -----------------------------------------------------------------------
    def adopt_orphans(self) -> list[Claim]:
        """Take over the files of every ingester found dead (see the module docstring); returns the new claims."""
        adopted: list[Claim] = []
        try:
            others = [entry for entry in os.scandir(self.root) if entry.is_dir(follow_symlinks=False)
                      and entry.name != self.ingester_id]
        except FileNotFoundError:
            return adopted
        now = self.clock()
        for entry in others:
            folder = Path(entry.path)
            if not self._is_dead(folder, now):
                continue
            taken = 0
            for orphan in list(_files_in(folder, self.inbox)):
                try:
                    claim = self._take(orphan.path, orphan.relative)
                except FileExistsError:
                    continue  # a file of that name is in our hands now: the next round takes it
                if claim is not None:
                    adopted.append(claim)
                    taken += 1
            if taken:
                log.warning("ingester %s is dead (no heartbeat for %.0fs or its process is gone); took over %d "
                            "claimed file(s)", entry.name, self.lease_seconds, taken)
            if not any(_files_in(folder, self.inbox)):
                _remove_folder(folder)
                _remove_if_empty(self.root)
                self._observed.pop(entry.name, None)
        return adopted

    def _is_dead(self, folder: Path, now: float) -> bool:
        try:
            info = os.stat(folder)
            signature: tuple[int, int] | None = (info.st_mtime_ns, info.st_ino)
        except OSError:
            signature = None
        _, pid, machine = _owner(folder.name)
        if machine == machine_hash() and pid is not None and not process_alive(pid):
            return True
        seen = self._observed.get(folder.name)
        if seen is None or seen.signature != signature:
            self._observed[folder.name] = _Observed(signature, now)
            return False
        return now - seen.since >= self.lease_seconds


def _owner(name: str) -> tuple[str, int | None, str]:
    """(host, pid, machine hash) from a claim folder's name; pid ``None`` when the name is not one of ours."""
    parts = name.rsplit("-", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return name, None, ""
    return parts[0], int(parts[1]), parts[2]


def machine_hash() -> str:
    """A short hash of :func:`machine_identity`, as it appears in claim folder names."""
    return hashlib.sha256(machine_identity().encode()).hexdigest()[:8]


@functools.cache
def machine_identity() -> str:
    """Host name, kernel boot id and process-namespace inode: equal only where process ids mean the same process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return f"{socket.gethostname()}:unknown:{secrets.token_hex(4)}"  # never matches: leases decide
    return f"{socket.gethostname()}:{boot}:{namespace}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _files_in(folder: Path, inbox: Path) -> Iterator[Claim]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            yield Claim(path, path.relative_to(folder), inbox)


def _same_entry(path: Path, before: os.stat_result) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) == (before.st_dev, before.st_ino)


def _prune_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``top`` while they are empty."""
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _remove_folder(folder: Path) -> None:
    """Remove a claim folder that holds no file any more (its empty sub-folders with it)."""
    for root, _, _ in sorted(os.walk(folder), key=lambda item: -len(item[0])):
        with contextlib.suppress(OSError):  # not empty: a file arrived, it is adopted next round
            os.rmdir(root)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another ingester's folder), or already gone
        folder.rmdir()
