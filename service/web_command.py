"""``covid-cxr web``: the read-only operator dashboard alone, for installations whose ``serve`` does not run here."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from covid_cxr.commandline import Subparsers, settings_from_args
from service.http_endpoints import start_dashboard

log = logging.getLogger(__name__)


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``web``; `common` is the parent parser with the installation flags."""
    web = subparsers.add_parser(
        "web", parents=[common], help="the read-only operator dashboard (also started by serve)",
        description="Serve the dashboard (overview, rejects, results, evaluation, models) with /healthz, /readyz "
                    "and /metrics. Listens on 127.0.0.1 unless told otherwise; any other interface needs "
                    "COVID_CXR_WEB_TOKEN. Ctrl-C stops it.")
    web.add_argument("--host", help="interface to listen on (COVID_CXR_WEB_HOST; default 127.0.0.1)")
    web.add_argument("--port", type=int, help="port (COVID_CXR_WEB_PORT; default 8080; 0: any free port)")
    web.set_defaults(func=run_web)


def run_web(args: argparse.Namespace) -> int:
    from db.migrate import check_schema

    settings = settings_from_args(args, web_host=args.host, web_port=args.port)
    check_schema(settings)
    server = start_dashboard(settings)
    stopped = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        log.info("%s received: stopping the dashboard", signal.Signals(signum).name)
        stopped.set()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopped.wait(1.0):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.stop()
    return 0
