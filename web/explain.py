"""The dashboard's Grad-CAM heatmaps on demand: the model version that scored an image, loaded on first use.

Nothing here runs unless asked: TensorFlow and the model are loaded by the first request for a heatmap
(never at start-up, never in the batch path), one model is kept, one heatmap is computed at a time (a
lock), and the computation runs in a worker thread, off the event loop. ``COVID_CXR_WEB_EXPLAIN=false``
switches it off, and then no request loads anything.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from covid_cxr.errors import CovidCxrError, ModelError
from covid_cxr.reasons import Reason
from covid_cxr.safe_output import printable
from covid_cxr.settings import Settings
from db.session import session_scope
from web.queries import normalized_png, registered_version, scoring_version

if TYPE_CHECKING:
    import numpy as np

    from db.models import ModelVersion

log = logging.getLogger(__name__)

#: Requests that may wait for the heatmap being computed; more are answered 503 at once, so that waiting
#: requests never take all of the threads the dashboard's pages run in.
MAX_WAITING = 4
#: Seconds a client is told to wait before asking again when the queue is full.
RETRY_AFTER_SECONDS = 5


class HeatmapUnavailable(CovidCxrError):
    """No heatmap can be made for this request; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str, *, reason: Reason) -> None:
        super().__init__(message, reason=reason)
        self.status = status


@dataclass(frozen=True)
class Heatmap:
    """A Grad-CAM overlay on one instance's 224x224 model input, and what made it."""

    png: bytes
    model: str  # "name version"
    layer: str


@dataclass(frozen=True)
class _Loaded:
    model_id: int
    sha256: str
    model: Any  # keras.Model: TensorFlow is not imported for the annotation


class Heatmaps:
    """Makes heatmaps for one dashboard: at most one model in memory, one computation at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        #: The computing request and those waiting for it.
        self._places = threading.BoundedSemaphore(MAX_WAITING + 1)
        self._loaded: _Loaded | None = None

    def heatmap(self, instance_id: int) -> Heatmap:
        """Grad-CAM of P(covid) for the instance's stored model input, by the model version that scored it.

        Blocks (call it from a worker thread). Raises :class:`HeatmapUnavailable`: 404 without a stored image
        (``no_stored_image``), without a prediction (``not_scored``) or when the scoring version is no longer
        registered (``model_not_found``); 409 when that version cannot be loaded (the registry's reason:
        ``sha256_mismatch``, ``artifact_missing``, ``unsafe_or_invalid``...); 503 when the queue is full
        (``explain_busy``).
        """
        image, record = self._target(instance_id)
        if not self._places.acquire(blocking=False):
            raise HeatmapUnavailable(503, f"{MAX_WAITING} heatmaps are waiting already; ask again in a few seconds",
                                     reason=Reason.EXPLAIN_BUSY)
        try:
            with self._lock:
                return self._compute(image, record)
        finally:
            self._places.release()

    def _target(self, instance_id: int) -> tuple[np.ndarray, ModelVersion]:
        from model_store.explain import stored_image

        with session_scope(self.settings) as session:
            png = normalized_png(session, instance_id)
            scored = scoring_version(session, instance_id)
            record = registered_version(session, *scored, self.settings.model_name) if scored else None
        try:
            image = stored_image(png, instance_id)
        except CovidCxrError as exc:
            raise HeatmapUnavailable(404, exc.message, reason=exc.reason) from exc
        if scored is None:
            raise HeatmapUnavailable(404, f"instance {instance_id} has no prediction: no model scored it yet",
                                     reason=Reason.NOT_SCORED)
        if record is None:
            raise HeatmapUnavailable(404, f"model version {scored[1]}, which scored instance {instance_id}, is no "
                                          "longer registered", reason=Reason.MODEL_NOT_FOUND)
        return image, record

    def _compute(self, image: np.ndarray, record: ModelVersion) -> Heatmap:
        from model_store.explain import grad_cam, last_conv_layer, overlay_png

        model = self._model(record)
        layer = last_conv_layer(model)
        return Heatmap(overlay_png(image, grad_cam(model, image, layer)), f"{record.name} {record.version}", layer)

    def _model(self, record: ModelVersion) -> Any:
        """``record``'s model: the one in memory, or loaded in its place (the lock is held)."""
        from model_store.registry import load_registered_model

        loaded = self._loaded
        if loaded is not None and (loaded.model_id, loaded.sha256) == (record.id, record.sha256):
            return loaded.model
        self._loaded = None
        del loaded
        gc.collect()  # the previous model's weights go before the next one's arrive
        try:
            model = load_registered_model(self.settings, record)
        except ModelError as exc:
            log.warning("heatmap: model %s %s cannot be loaded [%s]", record.name, record.version, exc.reason)
            raise HeatmapUnavailable(409, f"model {record.name} {record.version}, which scored this image, cannot "
                                          f"be loaded: {exc.message}", reason=exc.reason) from exc
        log.info("heatmap: loaded model %s %s", record.name, record.version)
        self._loaded = _Loaded(record.id, record.sha256, model)
        return model


def explain_endpoint(settings: Settings) -> Callable[[Request], Awaitable[Response]]:
    """The handler of ``/images/{instance_id}/explain.png``: the PNG, or a one-line plain-text reason."""
    heatmaps = Heatmaps(settings) if settings.web_explain else None

    async def explain(request: Request) -> Response:
        instance_id: int = request.path_params["instance_id"]
        try:
            if heatmaps is None:
                raise HeatmapUnavailable(404, "heatmaps are switched off on this dashboard (COVID_CXR_WEB_EXPLAIN)",
                                         reason=Reason.EXPLAIN_DISABLED)
            heatmap = await run_in_threadpool(heatmaps.heatmap, instance_id)
        except HeatmapUnavailable as exc:
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 503 else None
            return PlainTextResponse(f"no heatmap: {printable(exc.message)} [{exc.reason}]\n", status_code=exc.status,
                                     headers=headers)
        return Response(heatmap.png, media_type="image/png",
                        headers={"X-Explained-By": printable(f"{heatmap.model}, Grad-CAM at {heatmap.layer}")})

    return explain
