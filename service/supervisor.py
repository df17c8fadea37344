"""``serve``'s worker child kept running: a worker that dies is replaced, and the batch it held is re-sent at once.

The embedded broker drops a message when a worker takes it, so the batch a killed worker was
running exists only as ``queued`` rows; ``serve`` owns the only worker, so once it is dead every
``queued`` batch that is not waiting in the broker folder is lost and is re-sent before the new
worker starts. A worker that keeps dying (``max_restarts`` within ``window_seconds``: a broken
installation, not a bad moment) is not restarted again: ``serve`` stops and says so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Seconds a stopping worker may take to finish its batch before it is killed (the batch is redelivered).
WORKER_STOP_SECONDS = 30.0
#: Restarts allowed within :data:`RESTART_WINDOW_SECONDS` before ``serve`` gives up.
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 600.0
#: Pause before the first restart; doubled for each further restart within the window.
FIRST_RESTART_DELAY_SECONDS = 1.0


class WorkerSupervisor:
    """Starts the worker with ``start`` and restarts it when it exits while ``serve`` runs.

    Parameters
    ----------
    start
        Starts a worker process and returns it.
    after_death
        Called after a worker died and before the next one starts (re-sends its lost batch).
    give_up
        Called with the last exit status when the worker died too often; ``serve`` then stops.
    """

    def __init__(self, start: Callable[[], subprocess.Popen[bytes]], *, after_death: Callable[[], object],
                 give_up: Callable[[int], None], max_restarts: int = MAX_RESTARTS,
                 window_seconds: float = RESTART_WINDOW_SECONDS,
                 first_delay_seconds: float = FIRST_RESTART_DELAY_SECONDS) -> None:
        self._start = start
        self._after_death = after_death
        self._give_up = give_up
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self.first_delay_seconds = first_delay_seconds
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._restarts: deque[float] = deque()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._thread = threading.Thread(target=self._watch, name="worker-watch", daemon=True)

    def start(self) -> subprocess.Popen[bytes]:
        """Start the first worker and watch it."""
        with self._lock:
            self.process = self._start()
        self._thread.start()
        return self.process

    def _watch(self) -> None:
        while True:
            process = self.process
            assert process is not None
            code = process.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            while self._restarts and now - self._restarts[0] > self.window_seconds:
                self._restarts.popleft()
            if len(self._restarts) >= self.max_restarts:
                log.error("the worker process exited with status %s (its reason is logged just above); it died %d "
                          "times within %.0f s: not restarting it, stopping", code, len(self._restarts) + 1,
                          self.window_seconds)
                self._give_up(code)
                return
            delay = self.first_delay_seconds * 2 ** len(self._restarts)
            log.error("the worker process exited with status %s (its reason is logged just above); restarting it "
                      "in %.0f s", code, delay)
            self._restarts.append(now)
            try:
                self._after_death()
            except Exception:  # the new worker starts anyway; the reconciliation re-sends what is still lost
                log.exception("could not re-send the batches of the dead worker")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.process = self._start()
                self.restarts += 1

    def stop(self) -> None:
        """Stop watching and stop the worker: SIGTERM, up to :data:`WORKER_STOP_SECONDS` for its batch, then SIGKILL."""
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is None or process.poll() is not None:
            return
        log.info("stopping the worker process %d (up to %.0fs for the batch at hand)", process.pid,
                 WORKER_STOP_SECONDS)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the worker did not stop in time; killing it (its batch will be redelivered)")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
