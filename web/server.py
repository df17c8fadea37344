"""An HTTP server in a thread of the command that needs it: bound at once (a busy port fails), stopped cleanly."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from covid_cxr.errors import ConfigurationError
from covid_cxr.settings import Settings
from web.auth import check_exposure

log = logging.getLogger(__name__)

#: Seconds a server may take to come up, or to finish its open requests when stopped.
START_SECONDS = 15.0
STOP_SECONDS = 5.0


def listen(settings: Settings, port: int) -> socket.socket:
    """A listening socket on ``settings.web_host:port`` (0: any free port).

    Raises :class:`ConfigurationError` when the port cannot be had, or when the interface is reachable
    from other machines and no ``web_token`` is configured.
    """
    host = settings.web_host
    check_exposure(host, settings.web_token)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host}: {exc}") from exc
    family, kind, protocol, _, address = infos[0]
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


class HttpServer:
    """``app`` served by uvicorn on ``sock`` (see :func:`listen`) in a daemon thread; ``name`` is for the log."""

    def __init__(self, app: ASGIApp, sock: socket.socket, name: str) -> None:
        self.name = name
        self.socket = sock
        self.host, self.port = sock.getsockname()[:2]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name=f"http-{name}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        except Exception:
            log.exception("the %s server stopped", self.name)

    def start(self) -> HttpServer:
        """Serve in the background; returns once requests are answered."""
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigurationError(f"the {self.name} server on {self.url} did not start")
            time.sleep(0.02)
        log.info("%s on %s", self.name, self.url)
        return self

    def stop(self) -> None:
        """Finish open requests (a few seconds at most) and close the socket."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_SECONDS + 1)
        self.socket.close()

    def close_inherited_socket(self) -> None:
        """In a forked child (a Celery pool process): drop the inherited listening socket; the parent serves."""
        self.socket.close()
