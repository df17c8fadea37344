"""The ingest loop: complete inbox files -> read -> record -> batch -> enqueue, plus periodic reconciliation.

One thread does all the work (the watchdog observer thread only hints), so a file is read,
recorded and disposed of by exactly one code path. The steps, each testable alone:

1. :class:`~ingest.watcher.InboxWatcher` hands out files that are complete.
2. :func:`~ingest.reader.read_radiograph` decodes and normalizes, or rejects with a reason.
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

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import Instance, InstanceState
from ingest.inbox import (
    FileChanged,
    InboxEntryError,
    carry_out,
    entry_error,
    is_unchanged,
    move_no_clobber,
    read_inbox_file,
    relative_name,
    write_reason,
)
from ingest.inbox_presence import InboxPresence
from ingest.metrics import observe_file
from ingest.recorder import (
    Outcome,
    counts_by_state,
    find_recorded_file,
    record,
    set_stored_path,
)
from ingest.stuck import clear_stuck, mark_stuck
from ingest.watcher import InboxWatcher
from ingest.watermark import DiskWatermark, forget_ingest_status, ingester_name, record_ingest_status

log = logging.getLogger(__name__)

#: Seconds between progress lines while something changes.
PROGRESS_INTERVAL_SECONDS = 5.0
#: A file whose processing failed (database down, unreadable...) is retried after this long, doubling
#: with every failure up to MAX_RETRY_DELAY_SECONDS.
RETRY_DELAY_SECONDS = 10.0
MAX_RETRY_DELAY_SECONDS = 600.0
#: Longest sleep of the loop, so that settling files are re-checked often enough.
MAX_SLEEP_SECONDS = 0.5


class Batcher:
    """Groups instance ids into batches of ``batch_size``; a partial batch leaves after ``max_wait_seconds``.

    ``send(ids) -> bool`` publishes one batch; ``False`` (broker down) drops the batch from
    here: its instances stay ``received`` in the database, where reconciliation finds them.
    """

    def __init__(self, batch_size: int, max_wait_seconds: float, send: Callable[[list[int]], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.batch_size = batch_size
        self.max_wait_seconds = max_wait_seconds
        self._send = send
        self._clock = clock
        self._pending: list[int] = []
        self._oldest: float | None = None
        self.sent_batches = 0
        self.refused_batches = 0

    def add(self, instance_id: int) -> None:
        if not self._pending:
            self._oldest = self._clock()
        self._pending.append(instance_id)
        while len(self._pending) >= self.batch_size:
            self._emit(self.batch_size)

    def flush(self, *, force: bool = False) -> None:
        """Send the partial batch if it waited ``max_wait_seconds`` (or now, with ``force``)."""
        if self._pending and (force or self.seconds_until_due() == 0.0):
            self._emit(len(self._pending))

    def seconds_until_due(self) -> float | None:
        if not self._pending or self._oldest is None:
            return None
        return max(0.0, self._oldest + self.max_wait_seconds - self._clock())

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _emit(self, size: int) -> None:
        batch, self._pending = self._pending[:size], self._pending[size:]
        self._oldest = self._clock() if self._pending else None
        if self._send(batch):
            self.sent_batches += 1
        else:
            self.refused_batches += 1


class IngestService:
    """Runs the ingest loop for ``settings`` until :meth:`stop` (or a signal handler calling it).

    Parameters
    ----------
    settings
        The installation; the inbox, archive, quarantine and queues come from here.
    enqueue, requeue
        Publishing functions: ``enqueue(settings, ids) -> sent`` publishes one batch,
        ``requeue(settings) -> n`` re-sends what was never sent or was lost.
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
                               lambda ids: enqueue(settings, ids))
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
        self.started = threading.Event()

    # --- life cycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the file at hand, send the pending batch and return."""
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
        log.info("watching %s (settle %.1fs, batch %d or %.1fs, after ingest: %s, reconcile every %.0fs)",
                 self.settings.inbox.resolve(), self.settings.settle_seconds, self.settings.batch_size,
                 self.settings.batch_max_wait_seconds, self.settings.after_ingest,
                 self.settings.reconcile_interval_seconds)
        next_reconcile = 0.0  # at once: the start-up scan and a sweep for what a crash left behind
        next_progress = time.monotonic() + self._progress_interval
        last_reported: tuple[object, ...] | None = None
        self.started.set()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_reconcile:
                    self.reconcile()
                    next_reconcile = now + self.settings.reconcile_interval_seconds
                taking = self.may_take_files()
                for path in self.watcher.take_ready() if taking else ():
                    if self._stop.is_set():
                        self.watcher.retry_later(path)
                        continue
                    self._process_claimed(path)
                    self._send_due_batch()  # a long burst must not hold a partial batch past its wait
                self._send_due_batch()
                if time.monotonic() >= next_progress:
                    last_reported = self.report_progress(last_reported)
                    next_progress = time.monotonic() + self._progress_interval
                self.watcher.wait(self._sleep_seconds(next_reconcile, taking))
        finally:
            self._send_due_batch(force=True)
            self.watcher.stop()
            self.report_progress(None)
            self._forget_status()

    def _sleep_seconds(self, next_reconcile: float, taking: bool = True) -> float:
        waits = [MAX_SLEEP_SECONDS, next_reconcile - time.monotonic()]
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
    def _process_claimed(self, path: Path) -> None:
        try:
            self.process_file(path)
        except FileChanged as changed:  # its writer is still at it: not a problem, just not yet
            log.debug("%s: %s; read again once it settles", self._name(path), changed)
            self.watcher.retry_later(path, delay=self.settings.settle_seconds)
        except InboxEntryError as entry:
            self._stuck(path, entry.cause, entry.message)
        except Exception as exc:
            known = entry_error(exc) if isinstance(exc, OSError) else None
            if isinstance(exc, FileNotFoundError) and not path.exists():
                # Moved away under us (the inbox renamed, say): its row is kept, the move finished once it is back.
                log.warning("%s vanished while being ingested (%s); it is finished when it reappears",
                            self._name(path), exc.strerror or exc)
                self.watcher.retry_later(path, delay=RETRY_DELAY_SECONDS)
            elif known is not None:
                self._stuck(path, known.cause, known.message)
            else:
                self._stuck(path, Reason.INGEST_ERROR, f"{type(exc).__name__}: {exc}", traceback=True)
        else:
            self.watcher.release(path)
            self._unstuck(path)

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
        """Read, record and dispose of one complete file; ``None`` if it was gone or already recorded."""
        from ingest.reader import read_radiograph

        rel_name = relative_name(path, self.settings.inbox)
        try:
            inbox_file = read_inbox_file(path)
        except FileNotFoundError:
            return None
        data, sha256 = inbox_file.data, inbox_file.sha256
        known = find_recorded_file(self.settings, path, rel_name, sha256)
        if known is not None:
            self._finish_disposal(known, path)
            if known.state == InstanceState.received:  # its move failed before it was batched: send it now
                self.batcher.add(known.id)
            self.counts["already_recorded"] += 1
            log.info("%s: already recorded as instance %d (%s), not processed again", rel_name, known.id, known.state)
            return None

        started = time.perf_counter()
        result = read_radiograph(data, self.policy, sha256=sha256)
        decode_seconds = time.perf_counter() - started
        if not is_unchanged(path, inbox_file.identity):  # written to (or swapped) since: judge the final file
            raise FileChanged("changed after it was read")
        outcome = record(self.settings, path=path, rel_name=rel_name, file_size=len(data), result=result)
        observe_file(outcome.state.value, outcome.reason, result, decode_seconds)
        reason = outcome.reason_record(rel_name, sha256) if outcome.disposal.action == "quarantine" else None
        final = carry_out(outcome.disposal, path, reason, data=data)
        if final != outcome.disposal.destination:
            set_stored_path(self.settings, outcome.instance_id, final)
        if outcome.enqueue:
            self.batcher.add(outcome.instance_id)
        self.counts[outcome.state] += 1
        log.info("%s -> instance %d %s%s", rel_name, outcome.instance_id, outcome.state,
                 f" ({outcome.reason})" if outcome.reason else "")
        return outcome

    def _finish_disposal(self, row: Instance, path: Path) -> None:
        """Complete what a previous run committed for this very file but did not finish (or nothing, for keep)."""
        stored, here = Path(row.stored_path or ""), path.resolve()
        if stored == here:
            if self.settings.after_ingest == "delete":
                here.unlink(missing_ok=True)
                set_stored_path(self.settings, row.id, None)
            return
        if stored.exists():  # a second name of this same file: the move had linked but not unlinked
            here.unlink(missing_ok=True)
            return
        final = move_no_clobber(here, stored)
        if row.state == InstanceState.rejected:
            write_reason(final, {"reason": row.reason, "message": row.message, "instance_id": row.id,
                                 "file_name": row.file_name, "sha256": row.file_sha256,
                                 "sop_instance_uid": row.sop_instance_uid, "duplicate_of_id": row.duplicate_of_id,
                                 "conflict": row.conflict})
        if final != stored:
            set_stored_path(self.settings, row.id, final)

    # --- queue ---------------------------------------------------------------------------------
    def _send_due_batch(self, *, force: bool = False) -> None:
        try:
            self.batcher.flush(force=force)
        except Exception:  # the instances stay 'received': reconciliation sends them
            log.exception("could not send a batch; reconciliation will re-enqueue it")

    def reconcile(self) -> int:
        """Full inbox scan, then re-enqueue never-sent and lost instances; returns how many were re-sent."""
        found = self.watcher.scan()
        if found:
            log.debug("scan: %d new file(s) in the inbox", found)
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
        now = (self.watcher.waiting, self.batcher.pending, tuple(in_db.items()), tuple(this_run.items()))
        if now != last:
            waiting, pending, _, _ = now
            database = " ".join(f"{state}={n}" for state, n in in_db.items())
            run = " ".join(f"{state}={n}" for state, n in this_run.items()) or "nothing yet"
            log.info("progress | inbox: %d settling, %d batching | this run: %s | database: %s",
                     waiting, pending, run, database)
        return now


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
