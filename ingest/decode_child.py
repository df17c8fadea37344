"""The program of one decode process: reads files sent by :class:`~ingest.decode_pool.DecodePool`, under a memory cap.

Run as ``python -m ingest.decode_child MEMORY_MB LOG_LEVEL`` by the pool, never by hand. It
imports the reader and nothing above ``ingest`` (no TensorFlow, no database), caps its own
address space (``RLIMIT_AS``), asks the kernel to kill it when its parent dies, and then
answers messages on stdin/stdout (:mod:`multiprocessing.connection` framing, pickled):

* ``("policy", ReaderPolicy, encode_png)``: the acceptance policy for what follows, and whether an
  accepted result carries its image PNG-encoded as the database stores it (no answer);
* ``("read", job, data, sha256)`` -> ``("result", job, ReadResult, exiting, None)``;
* ``("read_path", job, path, identity)``: the same for a file this process reads itself (a claimed inbox
  file: the ingester then neither reads nor hashes it; a rejected file's bytes come back as the last item),
  answered ``("error", job, exception, False, None)``
  when the file cannot be read (:func:`ingest.inbox.read_inbox_file`'s errors) or is no longer the file
  of ``identity`` (device, inode, size, mtime), as the ingester saw it when it claimed it.

A read that ran out of memory is answered ``too_large`` with ``exiting`` true, and the
process exits: its heap may be fragmented or a C library left in a bad state, and a fresh
process costs about a second.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("ingest.decode_child")
#: How running out of memory reads in a message: Python's and numpy's errors, C++'s, C libraries'.
_OUT_OF_MEMORY_SIGNS = ("MemoryError", "Unable to allocate", "bad_alloc", "out of memory", "Out of memory")


def main(argv: list[str]) -> int:
    memory_mb, log_level = int(argv[1]), argv[2]
    parent = os.getppid()
    _die_with_parent(parent)
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    answers = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    requests = Connection(0, writable=False)
    _configure_logging(log_level)

    from pathlib import Path

    import cv2

    from covid_cxr.errors import InputRejected
    from covid_cxr.reasons import Reason
    from ingest.inbox import FileChanged, InboxEntryError, read_claimed_file
    from ingest.normalized_png import encode_png
    from ingest.reader import ReaderPolicy, RejectedResult, read_radiograph

    cv2.setNumThreads(1)  # the pool runs one process per core; threads inside would only compete
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    policy: ReaderPolicy | None = None
    encoding = False
    while True:
        try:
            message: Any = requests.recv()
        except EOFError:  # the pool closed the pipe: stop
            return 0
        except OSError:  # the pipe ended inside a message: the ingester died while sending (SIGKILL follows)
            return 1
        if message[0] == "policy":
            _, policy, encoding = message
            continue
        if policy is None:
            raise RuntimeError("a read request arrived before the policy")
        if message[0] == "read_path":
            _, job, path, identity = message
            try:
                inbox_file = read_claimed_file(Path(path), identity)
            except (OSError, InboxEntryError, FileChanged) as exc:
                if not _answer(answers, ("error", job, exc, False, None)):
                    return 1
                continue
            data, sha256 = inbox_file.data, inbox_file.sha256
            del inbox_file
        else:
            _, job, data, sha256 = message
        result = read_radiograph(data, policy, sha256=sha256)
        # A rejected file read here goes back with its bytes: its quarantine copy is written from what was judged.
        judged = data if message[0] == "read_path" and not result.accepted else None
        del data
        if encoding and result.accepted:  # the ingester stores this PNG: encoded here, where the work scales
            result = dataclasses.replace(result, png=encode_png(result.image))
        exiting = not result.accepted and _ran_out_of_memory(result.rejection)
        if exiting:
            rejection = InputRejected(f"decoding needed more than the {memory_mb} MiB a decode process may use "
                                      "(COVID_CXR_DECODE_MEMORY_MB)", reason=Reason.TOO_LARGE)
            result = RejectedResult(result.sha256, result.metadata, rejection, result.flags)
            log.warning("sha256=%s: out of memory; this decode process exits and is replaced", sha256)
        if not _answer(answers, ("result", job, result, exiting, judged)):
            return 1
        del judged
        if exiting:
            return 0


def _answer(answers: Connection, message: tuple[Any, ...]) -> bool:
    """Send one answer; ``False`` when the ingester is gone (BrokenPipeError: nobody to answer)."""
    try:
        answers.send(message)
    except OSError:
        return False
    return True


def _configure_logging(level: str) -> None:
    """As the ingester logs (``service.cli``): one line per record, control characters from headers escaped,
    pydicom's tracebacks for a failing decoder demoted to DEBUG (the file's rejection says it in one line)."""
    from covid_cxr.safe_output import log_handler, log_warnings

    root = logging.getLogger()
    root.addHandler(log_handler(sys.stderr, "%(asctime)s %(levelname)s decode[%(process)d] %(name)s: %(message)s"))
    root.setLevel(level)
    log_warnings()


def _ran_out_of_memory(rejection: BaseException) -> bool:
    """Whether a rejection came from running out of memory: a ``MemoryError`` in its chain of causes, or named in
    a message (pydicom reports the errors of all its plugins in one ``RuntimeError`` of their messages)."""
    seen: BaseException | None = rejection
    while seen is not None:
        if isinstance(seen, MemoryError) or any(sign in str(seen) for sign in _OUT_OF_MEMORY_SIGNS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _die_with_parent(parent: int) -> None:
    """Get SIGKILL when the ingester dies (Linux), so that no decode process outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
