"""The ingest loop: complete inbox files -> read -> record -> batch -> enqueue, plus periodic reconciliation.

One thread claims files and keeps the books (the watchdog observer thread only hints); decoding
happens in a pool of decode processes, and recording and moving in a few recorder threads, so that
database round trips overlap with decoding. The steps, each testable alone:

1. :class:`~ingest.watcher.InboxWatcher` hands out files that are complete, and
   :class:`~ingest.claims.ClaimFolder` claims each by renaming it into this ingester's claim folder
   (several ingesters may watch one inbox; each file is claimed by exactly one of them).
2. :func:`~ingest.reader.read_radiograph` decodes and normalizes, or rejects with a reason, in a
   :class:`~ingest.decode_pool.DecodePool` process (memory cap, time limit); files above
   ``max_file_bytes`` are rejected before they are read. The decode process reads and hashes the
   claimed file itself, checking it is still the file claimed (device, inode, size, mtime). Whether
   it was recorded before (a restart meeting its own file) is asked by the recorder thread, in the
   transaction that would record it. Kept files (``after_ingest=keep``), met again at every start,
   are read here and asked before decoding.
3. :func:`~ingest.recorder.record` commits the rows (and where the file will go).
4. :func:`~ingest.inbox.carry_out` archives, keeps, deletes or quarantines the file.
5. :class:`Batcher` groups new instances and the ``enqueue`` function sends one task per batch;
   a batch the broker refused stays ``received`` for step 6.
6. Every ``reconcile_interval_seconds``: a full inbox scan and the ``requeue`` function (never-sent
   and lost messages).

Files are taken only while the inbox folder is there (:mod:`ingest.inbox_presence` re-arms the
watcher when it comes back) and the disk has room (:mod:`ingest.watermark`).

The publishing functions are passed in by the composition root (:mod:`service`), normally
:func:`taskqueue.producer.enqueue_batch` and :func:`taskqueue.producer.requeue_stale`: ingest
never imports the queue.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import stat
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

from covid_cxr.errors import InputRejected
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import Instance, InstanceState
from ingest.claims import Claim, ClaimFolder
from ingest.inbox import (
    FileChanged,
    InboxEntryError,
    carry_out,
    entry_error,
    identity_of,
    is_unchanged,
    move_no_clobber,
    read_claimed_file,
    read_inbox_file,
    relative_name,
    write_reason,
)
from ingest.inbox_presence import InboxPresence
from ingest.limits import check_file_size
from ingest.metrics import observe_file
from ingest.recorder import (
    FileToRecord,
    Outcome,
    RecordedBefore,
    any_queued,
    counts_by_state,
    find_recorded_file,
    record_group,
    set_stored_path,
)
from ingest.stuck import clear_stuck, mark_stuck
from ingest.watcher import InboxWatcher
from ingest.watermark import DiskWatermark, forget_ingest_status, ingester_name, record_ingest_status

if TYPE_CHECKING:
    from ingest.decode_pool import Decoded, DecodePool
    from ingest.reader import ReadResult

log = logging.getLogger(__name__)

#: Seconds between progress lines while something changes.
PROGRESS_INTERVAL_SECONDS = 5.0
#: A file whose processing failed (database down, unreadable...) is retried after this long, doubling
#: with every failure up to MAX_RETRY_DELAY_SECONDS.
RETRY_DELAY_SECONDS = 10.0
MAX_RETRY_DELAY_SECONDS = 600.0
#: Longest sleep of the loop, so that settling files are re-checked often enough.
MAX_SLEEP_SECONDS = 0.5
#: Files claimed and read per decode process at most: one decoding, one waiting (so no process idles
#: while the loop reads the next file), and no more, so that other ingesters get their share of a burst.
IN_FLIGHT_PER_PROCESS = 2
#: Files a recorder thread writes in one transaction (one session, one commit, one fsync): a group leaves when it
#: has RECORD_GROUP_TARGET files, when nothing more is being decoded, or when its first file has waited
#: RECORD_GROUP_WAIT_SECONDS; it takes at most RECORD_GROUP_MAX. One file per transaction cost about 40 % more CPU.
RECORD_GROUP_TARGET = 4
RECORD_GROUP_WAIT_SECONDS = 0.25
RECORD_GROUP_MAX = 16


class Batcher:
    """Groups instance ids into batches of ``batch_size``; a partial batch leaves after ``max_wait_seconds``,
    or sooner when the workers are idle.

    ``send(ids) -> bool`` publishes one batch; ``False`` (broker down) drops the batch from
    here: its instances stay ``received`` in the database, where reconciliation finds them.

    ``idle() -> bool``, when given, says that nothing would join the batch soon and no worker has anything
    to do (:meth:`IngestService._workers_idle`). It is asked at most every ``idle_check_seconds`` while a
    partial batch waits, and a ``True`` sends the batch at once: holding a lone study back from idle
    workers only adds latency. Otherwise a partial batch fills up as before, so bursts and busy fleets
    still get full batches.
    """

    def __init__(self, batch_size: int, max_wait_seconds: float, send: Callable[[list[int]], bool],
                 clock: Callable[[], float] = time.monotonic, *, idle: Callable[[], bool] | None = None,
                 idle_check_seconds: float = 0.25) -> None:
        self.batch_size = batch_size
        self.max_wait_seconds = max_wait_seconds
        self._send = send
        self._clock = clock
        self._idle = idle
        self._idle_check_seconds = idle_check_seconds
        self._pending: list[int] = []
        self._oldest: float | None = None
        self._next_idle_check: float | None = None
        self.sent_batches = 0
        self.refused_batches = 0
        #: Partial batches sent before their wait because the workers were idle.
        self.sent_early = 0

    def add(self, instance_id: int) -> None:
        if not self._pending:
            self._started_waiting()
        self._pending.append(instance_id)
        while len(self._pending) >= self.batch_size:
            self._emit(self.batch_size)

    def flush(self, *, force: bool = False) -> None:
        """Send the partial batch if it waited ``max_wait_seconds`` (or now, with ``force``), or if the workers
        are idle (asked at most every ``idle_check_seconds``)."""
        if not self._pending:
            return
        if force or self._seconds_until_wait_over() == 0.0:
            self._emit(len(self._pending))
        elif self._idle is not None and self._next_idle_check is not None and self._clock() >= self._next_idle_check:
            self._next_idle_check = self._clock() + self._idle_check_seconds
            if self._idle():
                self.sent_early += 1
                self._emit(len(self._pending))

    def seconds_until_due(self) -> float | None:
        """Seconds until :meth:`flush` has something to do: the wait is over, or the next idle check."""
        wait = self._seconds_until_wait_over()
        if wait is None or self._idle is None or self._next_idle_check is None:
            return wait
        return min(wait, max(0.0, self._next_idle_check - self._clock()))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _seconds_until_wait_over(self) -> float | None:
        if not self._pending or self._oldest is None:
            return None
        return max(0.0, self._oldest + self.max_wait_seconds - self._clock())

    def _started_waiting(self) -> None:
        self._oldest = self._clock()
        self._next_idle_check = self._oldest + self._idle_check_seconds

    def _emit(self, size: int) -> None:
        batch, self._pending = self._pending[:size], self._pending[size:]
        if self._pending:
            self._started_waiting()
        else:
            self._oldest = self._next_idle_check = None
        if self._send(batch):
            self.sent_batches += 1
        else:
            self.refused_batches += 1


class IngestService:
    """Runs the ingest loop for ``settings`` until :meth:`stop` (or a signal handler calling it).

    Parameters
    ----------
    settings
        The installation; the inbox, archive, quarantine, queues and decode processes come from here.
    enqueue, requeue
        Publishing functions: ``enqueue(settings, ids) -> sent`` publishes one batch,
        ``requeue(settings) -> n`` re-sends what was never sent or was lost.

    The decode processes and the claim folder start with :meth:`run` (or the first
    :meth:`process_file`) and end with it (or :meth:`close`, or when the service is garbage).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        enqueue: Callable[[Settings, list[int]], bool],
        requeue: Callable[[Settings], int],
        progress_interval: float = PROGRESS_INTERVAL_SECONDS,
    ) -> None:
        from ingest.reader import ReaderPolicy

        self.settings = settings
        self.policy = ReaderPolicy.from_settings(settings)
        self.watcher = InboxWatcher(
            settings.inbox,
            settle_seconds=settings.settle_seconds,
            ignore_dirs=_own_folders(settings),
            polling=settings.use_polling_observer,
        )
        self.batcher = Batcher(settings.batch_size, settings.batch_max_wait_seconds,
                               lambda ids: enqueue(settings, ids),
                               idle=self._workers_idle if settings.batch_when_idle else None)
        self.presence = InboxPresence(self.watcher)
        self.watermark = DiskWatermark(settings)
        self.watermark.on_change = lambda _: self.publish_status()
        self._status_name = ingester_name(settings)
        self._requeue = requeue
        self._stop = threading.Event()
        self._progress_interval = progress_interval
        #: Outcomes of this run by state, plus ``already_recorded`` (files recognised after a restart).
        self.counts: Counter[str] = Counter()
        #: Entries that failed, by path: their cause and how often, for the back-off and the stuck list.
        self._stuck_entries: dict[Path, _Stuck] = {}
        self._resources = _Resources(ClaimFolder(settings.inbox, settings.claim_lease_seconds))
        self._finalizer = weakref.finalize(self, self._resources.close)
        #: Complete files handed out by the watcher and not claimed yet, and files adopted from dead ingesters.
        self._ready: deque[Path] = deque()
        self._adopted: deque[Claim] = deque()
        #: Files whose bytes are with the decode pool, by job key, and files being recorded.
        self._in_flight: dict[int, _InFlight] = {}
        #: Decoded files waiting for a recorder thread, and the groups the recorder threads are writing.
        self._to_record: deque[_Decoded] = deque()
        self._recording: dict[Future[list[Outcome | RecordedBefore | Exception]], list[_InFlight]] = {}
        self._keys = itertools.count()
        self.started = threading.Event()

    # --- life cycle ---------------------------------------------------------------------------
    @property
    def claims(self) -> ClaimFolder:
        """This ingester's claim folder under ``INBOX/.claims``."""
        return self._resources.claims

    @property
    def pool(self) -> DecodePool:
        """The decode processes (started on first use)."""
        return self._resources.start(self.settings, self.policy, self.watcher.wake)

    def close(self) -> None:
        """Stop the decode processes and give back what the claim folder still holds (also done by :meth:`run`)."""
        self._resources.close()

    def stop(self) -> None:
        """Ask the loop to finish the files at hand, send the pending batch and return."""
        self._stop.set()
        self.watcher.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Scan, then process files as they become complete until :meth:`stop`."""
        self.settings.inbox.mkdir(parents=True, exist_ok=True)
        self.watcher.start()
        self.presence.start()
        pool = self.pool
        log.info("watching %s (settle %.1fs, batch %d or %.1fs%s, after ingest: %s, reconcile every %.0fs, "
                 "%d decode process(es))", self.settings.inbox.resolve(), self.settings.settle_seconds,
                 self.settings.batch_size, self.settings.batch_max_wait_seconds,
                 " or when the workers are idle" if self.settings.batch_when_idle else "", self.settings.after_ingest,
                 self.settings.reconcile_interval_seconds, pool.processes)
        next_reconcile = 0.0  # at once: the start-up scan and a sweep for what a crash left behind
        next_progress = time.monotonic() + self._progress_interval
        last_reported: tuple[object, ...] | None = None
        rearmed = self.presence.rearmed
        self.started.set()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_reconcile:
                    self.reconcile()
                    next_reconcile = now + self.settings.reconcile_interval_seconds
                self._collect_recorded()  # first: it makes room for the next files
                self._finish_decoded()
                taking = self.may_take_files()
                if self.presence.rearmed != rearmed:  # the inbox is back: what its absence stranded goes on now
                    rearmed = self.presence.rearmed
                    self._take_up_forgotten_claims()
                if taking:
                    self._ready.extend(self.watcher.take_ready())
                    self._start_files()
                self._send_due_batch()  # a long burst must not hold a partial batch past its wait
                if time.monotonic() >= next_progress:
                    last_reported = self.report_progress(last_reported)
                    next_progress = time.monotonic() + self._progress_interval
                self.watcher.wait(self._sleep_seconds(next_reconcile, taking))
        finally:
            self._wind_down()
            self._send_due_batch(force=True)
            self.watcher.stop()
            self.close()
            self.report_progress(None)
            self._forget_status()

    def _wind_down(self) -> None:
        """Leave unclaimed files to the next run or another ingester; finish the files being decoded."""
        while self._ready:
            self.watcher.retry_later(self._ready.popleft())
        deadline = time.monotonic() + self.settings.decode_timeout_seconds + 10.0
        while (self._in_flight or self._to_record or self._recording) and time.monotonic() < deadline:
            self.pool.wait(0.05)
            self._finish_decoded()
            self._collect_recorded()

    def _sleep_seconds(self, next_reconcile: float, taking: bool = True) -> float:
        if self.pool.results_waiting or any(future.done() for future in self._recording):
            return 0.0
        waits = [MAX_SLEEP_SECONDS, next_reconcile - time.monotonic()]
        if self._to_record:  # a group waiting for more files leaves after RECORD_GROUP_WAIT_SECONDS at the latest
            waits.append(self._to_record[0].decoded_at + RECORD_GROUP_WAIT_SECONDS - time.monotonic())
        settling = self.watcher.seconds_until_next_check() if taking else None
        for wait in (settling, self.batcher.seconds_until_due()):
            if wait is not None:
                waits.append(wait)
        return max(0.01, min(waits))

    def may_take_files(self) -> bool:
        """Files are taken while the inbox folder is there and the disk has room (:mod:`ingest.watermark`)."""
        return self.presence.present() and not self.watermark.paused()

    def publish_status(self) -> None:
        """Write this ingester's watermark state where ``status`` reads it; a database away is no reason to stop."""
        try:
            record_ingest_status(self.settings, self._status_name, self.watermark)
        except Exception as exc:
            log.warning("could not record the ingest status: %s: %s", type(exc).__name__, exc)

    def _forget_status(self) -> None:
        try:
            forget_ingest_status(self.settings, self._status_name)
        except Exception as exc:
            log.warning("could not remove the ingest status: %s: %s", type(exc).__name__, exc)

    # --- one file ----------------------------------------------------------------------------
    def _start_files(self) -> None:
        """Claim, read and send to the decode processes as many ready files as they have room for."""
        with_bytes = IN_FLIGHT_PER_PROCESS * self.pool.processes  # files whose bytes this process holds
        taken = with_bytes + RECORD_GROUP_TARGET * self._resources.recorder_threads  # files claimed and not booked
        while ((self._adopted or self._ready) and self._files_with_bytes < with_bytes
               and len(self._in_flight) + self._files_recording < taken
               and not self._stop.is_set()):
            if self._adopted:
                claim = self._adopted.popleft()
                self._guarded(None, claim, functools.partial(self._begin, claim, None))
            else:
                path = self._ready.popleft()
                self._guarded(path, None, functools.partial(self._claim_and_begin, path))

    def _claim_and_begin(self, path: Path) -> None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            self.watcher.release(path)
            return
        if not stat.S_ISREG(info.st_mode):
            read_inbox_file(path)  # raises what the entry is (a link, a pipe...): it stays where it is
        claim = self.claims.claim(path)
        if claim is None:  # another ingester claimed it first
            log.debug("%s: claimed by another ingester", self._name(path))
            self.watcher.release(path)
            return
        self._begin(claim, path)

    def _decoded_items(self) -> list[_InFlight]:
        """The files decoded and not yet booked: waiting for a recorder thread, or being recorded."""
        return [decoded.item for decoded in self._to_record] + [
            item for items in self._recording.values() for item in items]

    @property
    def _files_recording(self) -> int:
        return len(self._decoded_items())

    @property
    def _files_with_bytes(self) -> int:
        return len(self._in_flight) + sum(item.data is not None for item in self._decoded_items())

    def _group_due(self, now: float) -> bool:
        """Whether the decoded files waiting should be written now rather than wait for more."""
        return (len(self._to_record) >= RECORD_GROUP_TARGET or not self._in_flight or self._stop.is_set()
                or now - self._to_record[0].decoded_at >= RECORD_GROUP_WAIT_SECONDS)

    def _finish_decoded(self) -> None:
        """Hand the decoded files to the recorder threads: each free thread takes all that wait, as one group."""
        recorders = self._resources.recorders
        assert recorders is not None
        now = time.monotonic()
        for answer in self.pool.results():
            item = self._in_flight.pop(cast(int, answer.key))
            self._guarded(item.watcher_path, item.claim,
                          functools.partial(self._queue_for_recording, item, answer, now))
        while self._to_record and len(self._recording) < self._resources.recorder_threads and self._group_due(now):
            group = [self._to_record.popleft() for _ in range(min(RECORD_GROUP_MAX, len(self._to_record)))]
            future = recorders.submit(self._record_and_dispose_group, group)
            future.add_done_callback(lambda _: self.watcher.wake())
            self._recording[future] = [decoded.item for decoded in group]

    def _queue_for_recording(self, item: _InFlight, answer: Decoded, now: float) -> None:
        self._to_record.append(self._to_be_recorded(item, answer, now))

    def _to_be_recorded(self, item: _InFlight, answer: Decoded, now: float) -> _Decoded:
        """A decode process's answer: the file to record (or to recognise as recorded before); raises the read
        error of a file read by path that was not the file claimed (or no regular file now)."""
        if answer.judged is not None:
            item = dataclasses.replace(item, data=answer.judged)
        if isinstance(answer.result, Exception):
            raise answer.result
        item, result = self._with_sha256(item, answer.result)
        if result.accepted:  # its bytes are needed no more (a quarantined file is written from what was judged)
            item = dataclasses.replace(item, data=None)
        return _Decoded(item, result, answer.seconds, now)

    def _collect_recorded(self) -> None:
        """Book the files the recorder threads are done with (or list and retry those that failed)."""
        for future in [future for future in self._recording if future.done()]:
            items = self._recording.pop(future)
            try:
                answers = future.result()
            except Exception as exc:  # not expected (each file's error is its answer): every file of the group failed
                answers = [exc] * len(items)
            for item, answer in zip(items, answers, strict=True):
                self._guarded(item.watcher_path, item.claim, functools.partial(self._after_record, item, answer))

    def _process_claimed(self, path: Path) -> None:
        """One file handed out by the watcher, start to end, here and now (failures listed and retried)."""
        self._guarded(path, None, lambda: self.process_file(path))

    def _guarded(self, path: Path | None, claim: Claim | None, step: Callable[[], object]) -> None:
        """Run ``step`` for one file; on failure give its claim back to the inbox and list or retry it."""
        try:
            step()
        except Exception as exc:
            if claim is not None or (path is not None and (claim := self._claim_of(path)) is not None):
                path = self._give_back(claim) or path
            if path is not None:
                self._file_failed(path, exc)
            else:
                log.exception("a claimed file failed and could not be given back; it is adopted when this ingester "
                              "stops")

    def _take_up_forgotten_claims(self) -> None:
        try:
            self._adopted.extend(self._forgotten_claims())
        except OSError:
            log.warning("could not look at the claim folder %s", self.claims.folder, exc_info=True)

    def _forgotten_claims(self) -> list[Claim]:
        """Files in this ingester's own claim folder that nothing works on any more, taken up again.

        A step that failed while the inbox was away (renamed, unmounted) can neither finish its file
        nor give it back; the file waits in the claim folder until this sweep, not until shutdown.
        """
        busy = {item.claim.path for item in (*self._in_flight.values(), *self._decoded_items())}
        busy |= {claim.path for claim in self._adopted}
        forgotten = [claim for claim in self.claims.held() if claim.path not in busy]
        if forgotten:
            log.info("taking up %d claimed file(s) again that no step holds any more", len(forgotten))
        return forgotten

    def _claim_of(self, path: Path) -> Claim | None:
        """The claim this ingester holds for the inbox file ``path`` (a failure inside :meth:`process_file`)."""
        try:
            relative = Path(os.path.relpath(path.parent.resolve() / path.name, self.claims.inbox))
        except ValueError:
            return None
        held = self.claims.folder / relative
        return Claim(held, relative, self.claims.inbox) if os.path.lexists(held) else None

    def _give_back(self, claim: Claim) -> Path | None:
        if not os.path.lexists(claim.path):  # already disposed of: nothing to give back
            return None
        try:
            back = self.claims.release(claim)
        except OSError:
            log.warning("could not give %s back to the inbox", claim.rel_name, exc_info=True)
            return None
        self.claims.done(claim)
        return back

    def _file_failed(self, path: Path, exc: Exception) -> None:
        if isinstance(exc, FileChanged):  # its writer is still at it: not a problem, just not yet
            log.debug("%s: %s; read again once it settles", self._name(path), exc)
            self.watcher.retry_later(path, delay=self.settings.settle_seconds)
        elif isinstance(exc, FileExistsError):  # this ingester holds a file of that name already
            self.watcher.retry_later(path, delay=self.settings.settle_seconds)
        elif isinstance(exc, InboxEntryError):
            self._stuck(path, exc.cause, exc.message)
        elif isinstance(exc, FileNotFoundError) and not path.exists():
            # Moved away under us (the inbox renamed, say): its row is kept, the move finished once it is back.
            log.warning("%s vanished while being ingested (%s); it is finished when it reappears",
                        self._name(path), exc.strerror or exc)
            self.watcher.retry_later(path, delay=RETRY_DELAY_SECONDS)
        else:
            known = entry_error(exc) if isinstance(exc, OSError) else None
            if known is not None:
                self._stuck(path, known.cause, known.message)
            else:
                self._stuck(path, Reason.INGEST_ERROR, f"{type(exc).__name__}: {exc}", traceback=True)

    def _name(self, path: Path) -> str:
        try:
            return relative_name(path, self.settings.inbox)
        except (OSError, ValueError):
            return str(path)

    def _stuck(self, path: Path, cause: Reason, message: str, *, traceback: bool = False) -> None:
        """List ``path`` as stuck, log the cause once (traceback at DEBUG) and retry after a growing delay."""
        previous = self._stuck_entries.get(path)
        attempts = 1 if previous is None else previous.attempts + 1
        delay = min(RETRY_DELAY_SECONDS * 2 ** (attempts - 1), MAX_RETRY_DELAY_SECONDS)
        name = self._name(path)
        self._stuck_entries[path] = _Stuck(name, cause, attempts)
        if previous is None or previous.cause != cause:
            log.warning("%s: stuck (%s): %s; retrying with growing delays, see `covid-cxr status`", name, cause,
                        message)
        log.debug("%s: attempt %d failed (%s), next in %.0fs", name, attempts, cause, delay, exc_info=traceback)
        try:
            mark_stuck(self.settings, name, cause, message, attempts)
        except Exception:  # the database may be the very cause: the entry is retried all the same
            log.debug("could not list %s as stuck", name, exc_info=True)
        self.watcher.retry_later(path, delay=delay)

    def _unstuck(self, path: Path) -> None:
        entry = self._stuck_entries.pop(path, None)
        if entry is not None:
            try:
                clear_stuck(self.settings, [entry.file_name])
            except Exception:
                log.debug("could not clear the stuck entry of %s", entry.file_name, exc_info=True)

    def process_file(self, path: Path) -> Outcome | None:
        """Claim, read (in a decode process), record and dispose of one complete file, synchronously.

        Returns ``None`` if the file was gone, claimed by another ingester or already recorded.
        Failures propagate, with the file given back to the inbox. Not for use while :meth:`run`
        runs (the loop collects every decode result).
        """
        pool = self.pool  # also opens the claim folder
        try:
            claim = self.claims.claim(path)
        except FileNotFoundError:
            return None
        if claim is None:
            return None
        try:
            item = self._begin(claim, path, submit=False)
            if not isinstance(item, _InFlight):
                return item
            self._submit(next(self._keys), item)
            while not (results := pool.results()):
                pool.wait(1.0)
            [answer] = results
            decoded = self._to_be_recorded(item, answer, time.monotonic())
            return self._complete(decoded.item, decoded.result, decoded.decode_seconds)
        except BaseException:
            self._give_back(claim)
            raise

    def _begin(self, claim: Claim, watcher_path: Path | None, *, submit: bool = True) -> Outcome | _InFlight | None:
        """Read a claimed file and send it to the decode processes, or finish it at once without decoding.

        Finished at once: a file above ``max_file_bytes`` (rejected ``too_large`` unread) and a kept
        file already recorded (its disposal is completed). Returns the outcome, ``None`` or the
        file now in flight (sent when ``submit``).
        """
        info = os.lstat(claim.path)
        size = info.st_size
        try:
            check_file_size(size, self.settings.max_file_bytes)
        except InputRejected as rejection:
            from ingest.reader import RejectedResult

            sha256, identity = _hash_unread(claim.path)
            item = _InFlight(claim, watcher_path, None, identity, size, sha256)
            return self._complete(item, RejectedResult(sha256, None, rejection))
        if self.settings.after_ingest != "keep":
            # The decode process reads and hashes the file itself (the claim keeps it still): this loop, which
            # all decode processes share, does neither. Whether it was recorded before is asked after decoding.
            if not stat.S_ISREG(info.st_mode):
                read_inbox_file(claim.path)  # raises what the entry is: it is given back and listed
            item = _InFlight(claim, watcher_path, None, identity_of(info), size, None)
        else:
            # Kept files stay in the inbox and are met again at every start: asked before decoding, by their bytes.
            inbox_file = read_inbox_file(claim.path)
            sha256 = inbox_file.sha256
            if self._already_recorded(claim, watcher_path, sha256):
                return None
            item = _InFlight(claim, watcher_path, inbox_file.data, inbox_file.identity, size, sha256,
                             asked_if_recorded=True)
        if submit:
            key = next(self._keys)
            self._in_flight[key] = item
            self._submit(key, item)
        return item

    def _submit(self, key: int, item: _InFlight) -> None:
        if item.data is not None and item.sha256 is not None:
            self.pool.submit(key, item.data, item.sha256)
        else:
            self.pool.submit_path(key, item.claim.path, item.identity)

    def _already_recorded(self, claim: Claim, watcher_path: Path | None, sha256: str) -> bool:
        """Whether this physical file is recorded already (a restart found it again): then its disposal is finished."""
        known = find_recorded_file(self.settings, claim.path, claim.rel_name, sha256)
        if known is None:
            return False
        self._finish_disposal(known, claim)
        self._book_recognised(claim, watcher_path, known)
        return True

    def _book_recognised(self, claim: Claim, watcher_path: Path | None, known: Instance) -> None:
        """The loop's books for a file recognised as recorded before, its disposal now finished."""
        self._done(claim, watcher_path)
        if known.state == InstanceState.received:  # its move failed before it was batched: send it now
            self.batcher.add(known.id)
        self.counts["already_recorded"] += 1
        log.info("%s: already recorded as instance %d (%s), not processed again", claim.rel_name, known.id,
                 known.state)

    def _with_sha256(self, item: _InFlight, result: ReadResult) -> tuple[_InFlight, ReadResult]:
        """A file its decode process read, with its sha256 from the result (or hashed here, if the process failed
        on it)."""
        if item.sha256 is not None:
            return item, result
        if not result.sha256:  # its decode process died or overran: the file is read here, for its row and quarantine
            inbox_file = read_claimed_file(item.claim.path, item.identity)
            item = dataclasses.replace(item, data=inbox_file.data)
            result = dataclasses.replace(result, sha256=inbox_file.sha256)
        return dataclasses.replace(item, sha256=result.sha256), result

    def _complete(self, item: _InFlight, result: ReadResult, decode_seconds: float = 0.0) -> Outcome | None:
        """Record a read file, dispose of it (archive, keep, delete, quarantine) and book it, here and now
        (``None``: it was recorded before, and its disposal is now finished)."""
        return self._after_record(item, self._record_and_dispose(item, result, decode_seconds))

    def _record_and_dispose(self, item: _InFlight, result: ReadResult,
                            decode_seconds: float = 0.0) -> Outcome | RecordedBefore:
        """Record a read file and dispose of it, here and now; raises the file's error."""
        [answer] = self._record_and_dispose_group([_Decoded(item, result, decode_seconds, time.monotonic())])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _record_and_dispose_group(self, group: list[_Decoded]) -> list[Outcome | RecordedBefore | Exception]:
        """Record read files in one transaction, then dispose of each; an outcome or an error per file, in order.

        Safe in a recorder thread: it touches no state of the loop. A file recorded before (a restart
        met its own file again) is recognised in the same transaction, and its disposal finished
        instead. A file written to (or swapped) since it was read is not recorded: its ``FileChanged``
        has it judged again, as it is now.
        """
        unchanged = [index for index, decoded in enumerate(group)
                     if is_unchanged(decoded.item.claim.path, decoded.item.identity)]
        files = [_file_to_record(group[index]) for index in unchanged]
        recorded = dict(zip(unchanged, record_group(self.settings, files), strict=True))
        answers: list[Outcome | RecordedBefore | Exception] = []
        for index, decoded in enumerate(group):
            answer = recorded[index] if index in recorded else FileChanged("changed after it was read")
            if isinstance(answer, RecordedBefore):
                try:
                    self._finish_disposal(answer.instance, decoded.item.claim)
                except Exception as exc:  # given back: the next attempt recognises it again
                    answer = exc
            elif isinstance(answer, Outcome):
                try:
                    answer = self._dispose(decoded, answer)
                except Exception as exc:  # the rows are committed: the next attempt finds them and finishes this
                    answer = exc
            answers.append(answer)
        return answers

    def _dispose(self, decoded: _Decoded, outcome: Outcome) -> Outcome:
        """Archive, keep, delete or quarantine a recorded file, as its outcome planned."""
        item, result, decode_seconds, _ = decoded
        claim = item.claim
        observe_file(outcome.state.value, outcome.reason, result, decode_seconds)
        if outcome.disposal.action == "keep":
            final: Path | None = self.claims.release(claim)
        else:
            reason = outcome.reason_record(claim.rel_name, result.sha256) \
                if outcome.disposal.action == "quarantine" else None
            final = carry_out(outcome.disposal, claim.path, reason, data=item.data)
        if final != outcome.disposal.destination:
            set_stored_path(self.settings, outcome.instance_id, final)
        return outcome

    def _after_record(self, item: _InFlight, outcome: Outcome | RecordedBefore | Exception) -> Outcome | None:
        """The loop's books for a recorded file: the claim, the watcher, the batch, the counts (or its error);
        ``None`` for a file recognised as recorded before."""
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome, RecordedBefore):
            self._book_recognised(item.claim, item.watcher_path, outcome.instance)
            return None
        claim = item.claim
        self._done(claim, item.watcher_path)
        if outcome.enqueue:
            self.batcher.add(outcome.instance_id)
        self.counts[outcome.state] += 1
        log.info("%s -> instance %d %s%s", claim.rel_name, outcome.instance_id, outcome.state,
                 f" ({outcome.reason})" if outcome.reason else "")
        return outcome

    def _done(self, claim: Claim, watcher_path: Path | None) -> None:
        self.claims.done(claim)
        if watcher_path is not None:
            self.watcher.release(watcher_path)
            self._unstuck(watcher_path)

    def _finish_disposal(self, row: Instance, claim: Claim) -> None:
        """Complete what a previous run (or a dead ingester) committed for this very file but did not finish."""
        stored = Path(row.stored_path or "")
        if stored == claim.inbox_path:  # kept, or its deletion pending
            if self.settings.after_ingest == "delete":
                claim.path.unlink(missing_ok=True)
                set_stored_path(self.settings, row.id, None)
            elif (back := self.claims.release(claim)) != stored:
                set_stored_path(self.settings, row.id, back)
            return
        if stored.exists():  # a second name of this same file: the move had linked but not unlinked
            claim.path.unlink(missing_ok=True)
            return
        final = move_no_clobber(claim.path, stored)
        if row.state == InstanceState.rejected:
            write_reason(final, {"reason": row.reason, "message": row.message, "instance_id": row.id,
                                 "file_name": row.file_name, "sha256": row.file_sha256,
                                 "sop_instance_uid": row.sop_instance_uid, "duplicate_of_id": row.duplicate_of_id,
                                 "conflict": row.conflict})
        if final != stored:
            set_stored_path(self.settings, row.id, final)

    # --- queue ---------------------------------------------------------------------------------
    def _workers_idle(self) -> bool:
        """The partial batch may leave now: this ingester has no more files in hand that would join it (none
        settling, claimed, decoding or being recorded), and no sent batch is waiting for or in a worker (no
        ``queued`` instance).

        While files are in hand a burst is arriving: its batches fill up instead of starting the model on a
        few images beside the decoding (measured slower on 2 cores). A database that cannot answer counts as
        busy: the batch then leaves after its wait, as without the check.
        """
        in_hand = (self._ready, self._adopted, self._in_flight, self._to_record, self._recording)
        if self.watcher.waiting or any(in_hand):
            return False
        try:
            return not any_queued(self.settings)
        except Exception as exc:  # SQLAlchemy and driver errors alike: the wait still sends the batch
            log.debug("could not ask whether the workers are idle: %s", type(exc).__name__)
            return False

    def _send_due_batch(self, *, force: bool = False) -> None:
        try:
            self.batcher.flush(force=force)
        except Exception:  # the instances stay 'received': reconciliation sends them
            log.exception("could not send a batch; reconciliation will re-enqueue it")

    def reconcile(self) -> int:
        """Full inbox scan, adoption of dead ingesters' files, then re-enqueue of never-sent and lost instances.

        Returns how many instances were re-sent.
        """
        found = self.watcher.scan()
        if found:
            log.debug("scan: %d new file(s) in the inbox", found)
        try:
            self._adopted.extend(self.claims.adopt_orphans())
        except OSError:
            log.warning("could not look for the files of dead ingesters under %s", self.claims.root, exc_info=True)
        self._take_up_forgotten_claims()
        self._forget_gone_stuck()
        self.publish_status()
        try:
            return self._requeue(self.settings)
        except Exception:
            log.exception("reconciliation could not re-enqueue; trying again in %.0fs",
                          self.settings.reconcile_interval_seconds)
            return 0

    def _forget_gone_stuck(self) -> None:
        gone = [path for path in self._stuck_entries if not _exists(path)]
        for path in gone:
            self._unstuck(path)

    # --- progress ------------------------------------------------------------------------------
    def report_progress(self, last: tuple[object, ...] | None) -> tuple[object, ...] | None:
        """Log one line of counts if anything changed since ``last``; returns what was reported."""
        try:
            in_db = counts_by_state(self.settings)
        except Exception:
            log.warning("database unreachable: no counts this time")
            return last
        this_run = dict(sorted(self.counts.items()))
        now = (self.watcher.waiting, len(self._in_flight), self.batcher.pending, tuple(in_db.items()),
               tuple(this_run.items()))
        if now != last:
            waiting, decoding, pending, _, _ = now
            database = " ".join(f"{state}={n}" for state, n in in_db.items())
            run = " ".join(f"{state}={n}" for state, n in this_run.items()) or "nothing yet"
            log.info("progress | inbox: %d settling, %d decoding, %d batching | this run: %s | database: %s",
                     waiting, decoding, pending, run, database)
        return now


def _file_to_record(decoded: _Decoded) -> FileToRecord:
    """What the recorder needs of a decoded file: recognised, rather than recorded, if a row already accounts for
    it (unless that was asked before decoding)."""
    item = decoded.item
    return FileToRecord(item.claim.inbox_path, item.claim.rel_name, item.size, decoded.result,
                        recognise_at=None if item.asked_if_recorded else item.claim.path)


class _Decoded(NamedTuple):
    """A file the decode processes are done with: what it is, what they made of it, and how long it took."""

    item: _InFlight
    result: ReadResult
    decode_seconds: float
    decoded_at: float


@dataclass(frozen=True)
class _InFlight:
    """A claimed file that was read: its bytes and the identity they came from.

    ``data`` is ``None`` for a file too large to read, and once a file was read and accepted: only a
    rejected file is written to quarantine from the bytes that were judged (an accepted file that turns
    out to conflict with a recorded one is moved there, as a file too large to read is).
    """

    claim: Claim
    watcher_path: Path | None
    data: bytes | None
    identity: tuple[int, int, int, int]
    size: int
    #: ``None`` until its decode process has read it (a file read by path).
    sha256: str | None
    #: Whether "recorded before?" was asked before decoding (a kept file); otherwise its recorder thread asks.
    asked_if_recorded: bool = False


class _Resources:
    """The decode pool and the claim folder of one service: started on first use, closed once."""

    def __init__(self, claims: ClaimFolder) -> None:
        self.claims = claims
        self.pool: DecodePool | None = None
        self.recorders: ThreadPoolExecutor | None = None
        self.recorder_threads = 1
        self._opened = False

    def start(self, settings: Settings, policy: object, wake: Callable[[], None]) -> DecodePool:
        from ingest.decode_pool import DecodePool
        from ingest.reader import ReaderPolicy

        if not self._opened:
            self.claims.open()
            self._opened = True
        if self.pool is None:
            assert isinstance(policy, ReaderPolicy)
            self.pool = DecodePool(policy, processes=settings.decode_process_count,
                                   memory_mb=settings.decode_memory_mb, timeout_seconds=settings.decode_timeout_seconds,
                                   on_result=wake, encode_png=True)
        if self.recorders is None:
            # SQLite takes one writer at a time; a server database takes one per decode process.
            self.recorder_threads = 1 if settings.database.startswith("sqlite") else settings.decode_process_count
            self.recorders = ThreadPoolExecutor(max_workers=self.recorder_threads, thread_name_prefix="recorder")
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.recorders is not None:
            self.recorders.shutdown(wait=True)
            self.recorders = None
        if self._opened:
            self.claims.close()
            self._opened = False


def _hash_unread(path: Path) -> tuple[str, tuple[int, int, int, int]]:
    """sha256 and identity of a file too large to hold in memory, read in chunks (links never followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        info = os.fstat(handle.fileno())
    return digest, identity_of(info)


@dataclass(frozen=True)
class _Stuck:
    file_name: str
    cause: Reason
    attempts: int


def _own_folders(settings: Settings) -> list[Path]:
    """Folders of this installation that may lie inside the inbox and must never be ingested."""
    return [settings.archive, settings.quarantine, settings.reports, settings.model_cache, settings.broker_dir]


def _exists(path: Path) -> bool:
    try:
        path.lstat()
    except FileNotFoundError:
        return False
    except OSError:  # a name too long to look at still exists
        return True
    return True
