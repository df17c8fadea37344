"""The Starlette applications: the dashboard (pages, model views, plots, probes) and the probes alone.

Handlers are plain functions (Starlette runs them in its thread pool: the queries block) that gather
data with :mod:`worker.results`, :mod:`web.queries` and the registry, and render a template; the
heatmap's handler (:mod:`web.explain`) hands its work to that pool itself. Nothing here builds HTML:
the templates do, with autoescaping on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import covid_cxr
from covid_cxr import metrics
from covid_cxr.safe_output import printable
from covid_cxr.settings import Settings
from web.auth import TokenGuard
from web.health import CHECKS, readiness

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).with_name("templates")
#: No script runs on any page, nothing is fetched from elsewhere, and no other site may frame one.
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # Pages hold results; a shared browser cache must not keep them.
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True)
class MetricsSource:
    """Where a ``/metrics`` page finds this process's own counters.

    ``registries`` are read from memory (a process that does not fork); ``multiprocess_dir`` is
    the folder of a worker's pool processes (``prometheus_client`` multiprocess mode).
    """

    registries: tuple[CollectorRegistry, ...] = ()
    multiprocess_dir: Path | None = None


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def template_environment() -> jinja2.Environment:
    """Autoescaped templates with the dashboard's filters; a missing variable is an error, not an empty cell."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters.update(printable=_printable, when=_when, duration=_duration, size=_size,
                               probability=_probability)
    return environment


def probe_routes(settings: Settings, source: MetricsSource, required: tuple[str, ...]) -> list[Route]:
    """``/healthz``, ``/readyz`` and ``/metrics`` of one process."""
    from web.metrics import InstallationCollector

    collector = InstallationCollector(settings)

    def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    def readyz(request: Request) -> Response:
        result = readiness(settings, required)
        return JSONResponse(result.to_dict(), status_code=200 if result.ready else 503)

    def metrics_page(request: Request) -> Response:
        body = metrics.exposition(source.registries, multiprocess_dir=source.multiprocess_dir,
                                  collectors=[collector])
        return Response(body, media_type=metrics.CONTENT_TYPE)

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics_page)]


def probe_app(settings: Settings, source: MetricsSource, required: tuple[str, ...] = CHECKS) -> Starlette:
    """The endpoints of ``covid-cxr ingest`` and ``covid-cxr worker``: probes and metrics, no pages."""
    return _application(probe_routes(settings, source, required), settings)


def dashboard_app(settings: Settings, source: MetricsSource = MetricsSource(),
                  required: tuple[str, ...] = CHECKS) -> Starlette:
    """The dashboard of ``covid-cxr web`` and ``serve``, with the probes and metrics of the process serving it."""
    from web import pages
    from web.explain import explain_endpoint

    templates = Jinja2Templates(env=template_environment())
    templates.env.globals.update(version=covid_cxr.__version__, model_name=settings.model_name,
                                 explain_heatmaps=settings.web_explain)

    def page(name: str, gather: Callable[[Settings, Request], dict[str, Any]]) -> Callable[[Request], Response]:
        def handler(request: Request) -> Response:
            try:
                context = gather(settings, request)
            except Exception as exc:  # database or broker down: say so on the page, keep serving
                log.warning("%s: %s: %s", request.url.path, type(exc).__name__, exc)
                context = {"page": "error", "generated_at": datetime.now(UTC), "error": f"{type(exc).__name__}: {exc}"}
                return templates.TemplateResponse(request, "error.html.j2", context, status_code=503)
            context.update(page=name, generated_at=datetime.now(UTC))
            return templates.TemplateResponse(request, f"{name}.html.j2", context)

        return handler

    routes = [
        Route("/", page("overview", pages.overview)),
        Route("/rejects", page("rejects", pages.rejects)),
        Route("/results", page("results", pages.results)),
        Route("/evaluation", page("evaluation", pages.evaluation)),
        Route("/models", page("models", pages.models)),
        Route("/images/{instance_id:int}.png", lambda request: pages.model_view(settings, request)),
        Route("/images/{instance_id:int}/explain.png", explain_endpoint(settings)),
        Route("/evaluation/{report_id:int}/report.html", lambda request: pages.report_page(settings, request)),
        Route("/evaluation/{report_id:int}/{plot}.png", lambda request: pages.report_plot(settings, request)),
        *probe_routes(settings, source, required),
    ]
    return _application(routes, settings)


def _application(routes: Iterable[Route], settings: Settings) -> Starlette:
    return Starlette(routes=list(routes), middleware=[Middleware(SecurityHeaders),
                                                      Middleware(TokenGuard, token=settings.web_token)])


# --- template filters ------------------------------------------------------------------------------


def _printable(value: Any) -> str:
    """Text from file names and headers with control characters escaped (autoescape then handles the markup)."""
    return "" if value is None else printable(str(value))


def _when(value: Any) -> str:
    if value is None:
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _size(count: float | None) -> str:
    if count is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _probability(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
