"""The HTTP side of the long-running commands: the dashboard of ``web`` and ``serve``, the probes of ``ingest``
and ``worker``, and the folder in which a forking worker's processes keep their Prometheus counters.

``prometheus_client`` decides at import whether a process counts in memory or in files shared with
its children, so a worker's folder is set up here *before* anything imports it; nothing this
module imports at module level does.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from covid_cxr.settings import Settings

if TYPE_CHECKING:
    from web.server import HttpServer

log = logging.getLogger(__name__)

#: Mirrors :data:`covid_cxr.metrics.MULTIPROCESS_ENV`; importing that module here would decide the mode too early.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Readiness checks per command: an ingester needs no model, the dashboard alone needs the database only.
INGEST_CHECKS = ("database", "broker")
INFERENCE_WORKER_CHECKS = ("database", "broker", "model")
SERVE_CHECKS = ("database", "broker", "model")
WEB_CHECKS = ("database",)


def metrics_folder(settings: Settings, name: str) -> Path:
    """``DATA_DIR/metrics/NAME``, emptied: the counters of a previous run of that process are gone."""
    folder = (settings.data_dir / "metrics" / name).expanduser().resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def enter_multiprocess_mode(folder: Path) -> None:
    """Make this process (and the pool processes it forks) count in ``folder``.

    Raises ``RuntimeError`` when ``prometheus_client`` was imported already, in memory mode: the
    pool's counters would be lost, so a change that imports it earlier must fail its tests.
    """
    if "prometheus_client" in sys.modules and os.environ.get(MULTIPROCESS_ENV) != str(folder):
        raise RuntimeError("prometheus_client was imported before the worker chose its metrics folder")
    os.environ[MULTIPROCESS_ENV] = str(folder)


def start_dashboard(settings: Settings, *, serve_metrics_folder: Path | None = None) -> HttpServer:
    """The dashboard of ``serve`` (with this process's ingest counters and its worker's) or of ``web`` alone."""
    from covid_cxr.metrics import INGEST_REGISTRY
    from web.app import MetricsSource, dashboard_app
    from web.server import HttpServer, listen

    sock = listen(settings, settings.web_port)
    if serve_metrics_folder is not None:
        source = MetricsSource((INGEST_REGISTRY,), serve_metrics_folder)
        app = dashboard_app(settings, source, SERVE_CHECKS)
    else:
        app = dashboard_app(settings, MetricsSource(), WEB_CHECKS)
    return HttpServer(app, sock, "dashboard").start()


def start_ingest_probes(settings: Settings) -> HttpServer | None:
    """``/healthz``, ``/readyz`` and ``/metrics`` of ``covid-cxr ingest`` on ``probe_port``; none when it is unset."""
    if settings.probe_port is None:
        return None
    from covid_cxr.metrics import INGEST_REGISTRY
    from web.app import MetricsSource, probe_app
    from web.server import HttpServer, listen

    sock = listen(settings, settings.probe_port)
    return HttpServer(probe_app(settings, MetricsSource((INGEST_REGISTRY,)), INGEST_CHECKS), sock, "probes").start()


def start_worker_probes(settings: Settings, serves_inference: bool) -> HttpServer | None:
    """The probes of ``covid-cxr worker`` on ``probe_port``, counting in ``DATA_DIR/metrics/worker-PORT``.

    None when ``probe_port`` is unset, or when the worker was started by ``serve``, which hands it
    its metrics folder in the environment and answers for it on the dashboard's port. Must run
    before anything imports ``prometheus_client`` (see :func:`enter_multiprocess_mode`).
    """
    if os.environ.get(MULTIPROCESS_ENV) or settings.probe_port is None:
        return None
    from web.server import HttpServer, listen

    sock = listen(settings, settings.probe_port)
    folder = metrics_folder(settings, f"worker-{sock.getsockname()[1]}")
    enter_multiprocess_mode(folder)
    from web.app import MetricsSource, probe_app

    checks = INFERENCE_WORKER_CHECKS if serves_inference else INGEST_CHECKS
    return HttpServer(probe_app(settings, MetricsSource(multiprocess_dir=folder), checks), sock, "probes").start()
