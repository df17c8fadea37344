"""``serve``'s worker supervisor with real child processes: a killed worker is replaced, a crash loop stops serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from service_fixtures import wait_until

from service.supervisor import WorkerSupervisor


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)


def _crasher() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True)


def test_a_killed_worker_is_replaced_after_its_batches_are_re_sent():
    deaths: list[int] = []
    given_up: list[int] = []
    supervisor = WorkerSupervisor(_sleeper, after_death=lambda: deaths.append(1), give_up=given_up.append,
                                  first_delay_seconds=0.1)
    first = supervisor.start()
    try:
        os.killpg(first.pid, signal.SIGKILL)
        replacement = wait_until(lambda: supervisor.process if supervisor.process is not first else None,
                                 timeout=20, what="a new worker")
        assert replacement.poll() is None
        assert (deaths, given_up, supervisor.restarts) == ([1], [], 1)
    finally:
        supervisor.stop()
    assert replacement.wait(10) == -signal.SIGTERM, "stopped with SIGTERM (a warm shutdown for a Celery worker)"
    assert first.returncode == -signal.SIGKILL


def test_a_worker_that_keeps_dying_stops_serve_with_its_status():
    stopped = threading.Event()
    statuses: list[int] = []

    def give_up(code: int) -> None:
        statuses.append(code)
        stopped.set()

    supervisor = WorkerSupervisor(_crasher, after_death=lambda: None, give_up=give_up, max_restarts=2,
                                  first_delay_seconds=0.05)
    supervisor.start()
    assert stopped.wait(30)
    assert statuses == [3] and supervisor.restarts == 2
    supervisor.stop()
