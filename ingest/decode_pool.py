"""Reads files in separate decode processes, each under a memory cap and a per-file time limit; replaces any that fail.

The ingester (and training) never decode in their own process: a decompression bomb, a
decoder that loops or crashes, costs one decode process and gets its file a typed
rejection, while the caller goes on. Each process is a fresh interpreter running
:mod:`ingest.decode_child` (not a fork: a parent that has loaded TensorFlow, as training
has, passes nothing on), and it is killed with its parent.

One thread per process here sends a file, waits for the answer or the deadline, and puts
the result where :meth:`DecodePool.results` collects it; ``on_result`` (e.g. waking the
ingest loop) is called after each one.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

from covid_cxr.errors import InputRejected
from covid_cxr.reasons import Reason
from ingest.reader import ReaderPolicy, ReadResult, RejectedResult

log = logging.getLogger(__name__)

#: Seconds a new decode process may take to start (import the reader) before it counts as failed.
START_TIMEOUT_SECONDS = 60.0
#: Environment of a decode process: one thread per process (the pool is the parallelism), few malloc arenas
#: (each thread's arena reserves 64 MiB of address space, which counts against RLIMIT_AS), and a heap that keeps
#: what a file freed for the next one: buffers up to 32 MiB (a 16 M pixel 16-bit frame) come from the heap, and
#: up to 128 MiB freed at its top stays mapped. glibc's own adaptive thresholds returned and re-faulted the
#: decoded frames' pages for file after file, 2500 page faults and about 5 ms of CPU per chest radiograph.
_CHILD_ENVIRONMENT = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                      "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                      "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}
_STOP = object()


class Decoded(NamedTuple):
    """One file's result: its key, what the reader made of it, and the seconds from sending it to the answer.

    ``result`` is the exception of :func:`ingest.inbox.read_inbox_file` (not a regular file, gone, changed
    since it was claimed) when a file submitted by path could not be read as the file it was.
    """

    key: Hashable
    result: ReadResult | Exception
    seconds: float
    #: The bytes judged, for a file read by path and rejected (its quarantine copy is written from them).
    judged: bytes | None = None


class DecodePool:
    """``processes`` decode processes reading files with ``policy``; use as a context manager or call :meth:`close`.

    Parameters
    ----------
    policy
        The acceptance policy every process reads with.
    processes
        How many decode processes (at least 1).
    memory_mb
        ``RLIMIT_AS`` of each process in MiB; a file that needs more is rejected ``too_large``.
    timeout_seconds
        Wall-clock limit per file; a process that exceeds it is killed and its file rejected ``decode_timeout``.
    on_result
        Called (from a pool thread) after each result is ready.
    encode_png
        Whether an accepted result also carries its image as the PNG the database stores (the
        ingester records it; training has no use for it).
    """

    def __init__(self, policy: ReaderPolicy, *, processes: int, memory_mb: int, timeout_seconds: float,
                 on_result: Callable[[], None] | None = None, encode_png: bool = False) -> None:
        if processes < 1:
            raise ValueError(f"a decode pool needs at least one process, got {processes}")
        self.policy = policy
        self.processes = processes
        self.memory_mb = memory_mb
        self.timeout_seconds = timeout_seconds
        self._on_result = on_result
        self.encode_png = encode_png
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._done: deque[Decoded] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._submitted = 0
        self._slots = [_Slot(self, index) for index in range(processes)]
        self._threads = [threading.Thread(target=slot.run, name=f"decode-{index}", daemon=True)
                         for index, slot in enumerate(self._slots)]
        for thread in self._threads:
            thread.start()

    # --- life cycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process after the file at hand (results of submitted files stay collectable)."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the decode processes running now."""
        return [slot.pid for slot in self._slots if slot.pid is not None]

    # --- work ---------------------------------------------------------------------------------
    def submit(self, key: Hashable, data: bytes, sha256: str) -> None:
        """Queue one file's bytes for reading; its result comes back from :meth:`results` under ``key``."""
        with self._lock:
            self._submitted += 1
        self._jobs.put((key, ("read", data, sha256)))

    def submit_path(self, key: Hashable, path: Path, identity: tuple[int, int, int, int]) -> None:
        """Queue one file for a decode process to read itself (links never followed), if it is still the file of
        ``identity``; its result carries the sha256 of the bytes read. A process that dies or overruns on it
        gives a rejection whose sha256 is empty: the caller hashes the file then."""
        with self._lock:
            self._submitted += 1
        self._jobs.put((key, ("read_path", str(path), identity)))

    @property
    def in_flight(self) -> int:
        """Files submitted whose results have not been collected yet."""
        with self._lock:
            return self._submitted

    @property
    def idle_processes(self) -> int:
        """How many more files could start decoding now."""
        return max(0, self.processes - self.in_flight)

    @property
    def results_waiting(self) -> bool:
        """Whether results are ready to be collected."""
        with self._lock:
            return bool(self._done)

    def results(self) -> list[Decoded]:
        """The results ready now (each returned once), in the order they finished."""
        ready: list[Decoded] = []
        with self._lock:
            self._ready.clear()
            while self._done:
                ready.append(self._done.popleft())
            self._submitted -= len(ready)
        return ready

    def read_all(self, files: Iterable[tuple[Hashable, bytes, str]]) -> Iterator[tuple[Hashable, ReadResult]]:
        """Read ``(key, data, sha256)`` files with every process busy, yielding results as they finish.

        At most two files per process are held in memory at once.
        """
        pending = iter(files)
        exhausted = False
        while True:
            while not exhausted and self.in_flight < 2 * self.processes:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                else:
                    self.submit(*item)
            if exhausted and self.in_flight == 0:
                return
            self.wait(1.0)
            for decoded in self.results():
                assert not isinstance(decoded.result, Exception), "only a file submitted by path has no result"
                yield decoded.key, decoded.result

    def wait(self, timeout: float) -> None:
        """Sleep until a result is ready (one may be already) or ``timeout`` seconds pass."""
        self._ready.wait(timeout)

    def _finish(self, key: Hashable, result: ReadResult | Exception, seconds: float,
                judged: bytes | None = None) -> None:
        with self._lock:
            self._done.append(Decoded(key, result, seconds, judged))
            self._ready.set()
        if self._on_result is not None:
            self._on_result()


class _Slot:
    """One decode process and the thread that feeds it."""

    def __init__(self, pool: DecodePool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.requests: Connection | None = None
        self.answers: Connection | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def run(self) -> None:
        try:
            try:
                self.ensure_started()  # at once, so that the first file does not wait for the interpreter
            except OSError:
                log.warning("could not start decode process %d; trying again with the first file", self.index,
                            exc_info=True)
            while True:
                job = self.pool._jobs.get()
                if job is _STOP:
                    return
                key, request = job
                started = time.monotonic()
                result, judged = self.read(request)
                self.pool._finish(key, result, time.monotonic() - started, judged)
        finally:
            self.stop()

    def read(self, request: tuple[str, Any, Any]) -> tuple[ReadResult | Exception, bytes | None]:
        """One file's result; never raises (a failing process becomes the file's rejection)."""
        kind, first, second = request
        sha256 = second if kind == "read" else ""  # a file read by path: its sha256 comes with the answer
        for attempt in (1, 2):
            try:
                self.ensure_started()
                assert self.requests is not None and self.answers is not None
                self.requests.send((kind, self.index, first, second))
            except (OSError, EOFError, RuntimeError) as exc:  # the process died before it had the file
                self.stop()
                if attempt == 2:
                    return _rejected(sha256, f"no decode process could be started: {exc}",
                                     Reason.INTERNAL_ERROR), None
                continue
            return self.await_answer(sha256)
        raise AssertionError("unreachable")

    def await_answer(self, sha256: str) -> tuple[ReadResult | Exception, bytes | None]:
        assert self.answers is not None and self.process is not None
        timeout = self.pool.timeout_seconds
        try:
            if self.answers.poll(timeout):
                # ("result", job, ReadResult, exiting, judged bytes or None) or ("error", job, exception, False, None)
                _, _, result, exiting, judged = self.answers.recv()
                if exiting:
                    self.stop()
                return result, judged
        except (OSError, EOFError):
            self.process.wait(timeout=10)
            code = self.process.returncode
            self.stop()
            return _rejected(sha256, f"the decode process died ({_describe_exit(code)}) while reading this file",
                             Reason.DECODE_FAILED), None
        log.warning("sha256=%s: reading took longer than %.0f s; killing decode process %d", sha256 or "-", timeout,
                    self.process.pid)
        self.stop(kill=True)
        return _rejected(sha256, f"reading the file took longer than the limit of {timeout:g} s "
                                 "(COVID_CXR_DECODE_TIMEOUT_SECONDS)", Reason.DECODE_TIMEOUT), None

    def ensure_started(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.stop()
        package_root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, **_CHILD_ENVIRONMENT, "PYTHONPATH": path}
        level = logging.getLevelName(logging.getLogger("ingest").getEffectiveLevel())
        command = [sys.executable, "-m", "ingest.decode_child", str(self.pool.memory_mb), level]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        close_fds=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests = Connection(os.dup(self.process.stdin.fileno()), readable=False)
        self.answers = Connection(os.dup(self.process.stdout.fileno()), writable=False)
        self.process.stdin.close()
        self.process.stdout.close()
        self.requests.send(("policy", self.pool.policy, self.pool.encode_png))
        log.debug("decode process %d started (memory limit %d MiB)", self.process.pid, self.pool.memory_mb)

    def stop(self, *, kill: bool = False) -> None:
        """End the process: close its pipes (it exits at EOF), or SIGKILL it; reap it either way."""
        for connection in (self.requests, self.answers):
            if connection is not None:
                connection.close()
        self.requests = self.answers = None
        process, self.process = self.process, None
        if process is None:
            return
        if kill and process.poll() is None:
            process.send_signal(signal.SIGKILL)
        try:
            process.wait(timeout=START_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _rejected(sha256: str, message: str, reason: Reason) -> RejectedResult:
    return RejectedResult(sha256, None, InputRejected(message, reason=reason))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"
