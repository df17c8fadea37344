"""The worker's Celery application: the shared configuration of :mod:`taskqueue.app` plus the task modules.

Importing this module is cheap and never imports TensorFlow: the parent worker process forks its pool
children from here. ``celery -A worker.app`` finds the app as ``app``.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from covid_cxr.settings import Settings, load_settings
from taskqueue.app import create_app

#: Modules whose tasks every worker registers.
TASK_MODULES = ("worker.tasks", "worker.evaluation")


def create_worker_app(settings: Settings) -> Celery:
    """The app a worker runs: the shared configuration with this package's tasks registered."""
    return create_app(settings, include=TASK_MODULES)


_app: Celery | None = None
_app_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # ``app`` is built on first use, so importing the task names has no side effects
    # (no settings read, no broker folders created); ``celery -A worker.app`` still finds it.
    global _app
    if name == "app":
        with _app_lock:
            if _app is None:
                _app = create_worker_app(load_settings())
            return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
