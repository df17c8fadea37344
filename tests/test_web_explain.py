"""The dashboard's Grad-CAM heatmap (``/images/ID/explain.png``): made on request by the model that scored the image.

Served over real HTTP by the dashboard ``covid-cxr web`` starts (uvicorn in a thread, behind the token guard),
with the random-weights VGG16 of ``model_artifact``; what cannot be explained is answered with a reason code.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_fixtures import ActiveModel, chest_images, embedded_settings, record_instances
from web_fixtures import RunningWeb, fetch

from covid_cxr.settings import Settings

TOKEN = "heatmap-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def predict(settings: Settings, record: Any, ids: list[int]) -> None:
    """What a worker writes for ``ids`` scored by ``record`` (chosen probabilities: no forward pass needed)."""
    from ingest.pixels import PREPROCESSING_VERSION
    from worker.inference import LoadedModel
    from worker.tasks import claim_instances, store_predictions

    model = LoadedModel(model=None, model_id=record.id, name=record.name, version=record.version,
                        sha256=record.sha256, threshold=0.5, class_names=("covid", "normal"), positive_class="covid",
                        preprocessing_version=PREPROCESSING_VERSION)
    claimed, _ = claim_instances(settings, ids)
    covid = np.linspace(0.8, 0.2, len(claimed))
    store_predictions(settings, model, f"batch-{uuid.uuid4().hex[:8]}", claimed, np.stack([covid, 1 - covid], axis=1),
                      forward_ms=100.0)


def stored_input(settings: Settings, instance_id: int) -> np.ndarray:
    from db.session import session_scope
    from model_store.explain import stored_image
    from web.queries import normalized_png

    with session_scope(settings) as session:
        return stored_image(normalized_png(session, instance_id), instance_id)


def loads(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The versions the dashboard's heatmaps loaded, in order."""
    return [str(record.args[1]) for record in caplog.records  # args: (name, version)
            if record.name == "web.explain" and record.msg.startswith("heatmap: loaded model")]


def explain_link(instance_id: int) -> str:
    return f'href="/images/{instance_id}/explain.png"'


def second_version(settings: Settings, active_model: ActiveModel, folder: Path) -> Any:
    """The same model bytes registered under another version (as a retrained model would be)."""
    from model_store.registry import import_artifact

    copy = Path(shutil.copytree(active_model.artifact.directory, folder))
    metadata = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**metadata, "version": metadata["version"] + "-b"}))
    return import_artifact(settings, copy)


@pytest.mark.slow
def test_a_heatmap_is_made_on_request_by_the_model_that_scored_the_image(
        active_model: ActiveModel, cxr_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import cv2

    from model_store.explain import grad_cam, overlay_png
    from model_store.registry import load_registered_model
    from service.http_endpoints import start_dashboard

    caplog.set_level(logging.INFO, logger="web.explain")
    settings = embedded_settings(tmp_path / "data", web_port=0, web_token=TOKEN)
    record = active_model.register(settings)
    other = second_version(settings, active_model, tmp_path / "other")
    scored, by_other, unscored = record_instances(settings, chest_images(cxr_dir, 3))
    predict(settings, record, [scored])
    predict(settings, other, [by_other])
    server = start_dashboard(settings)
    try:
        path = server.url + f"images/{scored}/explain.png"
        status, headers, _ = fetch(path)
        assert status == 401 and headers["www-authenticate"].startswith("Basic"), "the token guards heatmaps too"
        assert not loads(caplog), "nothing is loaded before the first request"
        status, headers, body = fetch(path, AUTH)
        assert status == 200 and headers["content-type"] == "image/png", body[:300]
        assert headers["x-explained-by"] == f"{record.name} {record.version}, Grad-CAM at block5_conv3"
        assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED).shape == (224, 224, 3)
        # Exactly Grad-CAM of the scoring model over the stored 224x224 input, and the same bytes every time.
        image = stored_input(settings, scored)
        assert body == overlay_png(image, grad_cam(load_registered_model(settings, record), image))
        assert fetch(path, AUTH)[2] == body
        # Each image is explained by the version that scored it; one model is kept, loaded again only to switch.
        status, headers, _ = fetch(server.url + f"images/{by_other}/explain.png", AUTH)
        assert status == 200 and headers["x-explained-by"].startswith(f"{other.name} {other.version},")
        assert loads(caplog) == [record.version, other.version]

        status, _, body = fetch(server.url + "images/999999/explain.png", AUTH)
        assert status == 404 and body.endswith(b"[no_stored_image]\n")
        status, _, body = fetch(server.url + f"images/{unscored}/explain.png", AUTH)
        assert status == 404 and b"no model scored it" in body and body.endswith(b"[not_scored]\n")
        status, _, page = fetch(server.url + "results", AUTH)
        assert status == 200 and explain_link(scored).encode() in page and explain_link(unscored).encode() not in page
    finally:
        server.stop()

    server = start_dashboard(settings.model_copy(update={"web_explain": False}))
    try:
        status, _, body = fetch(server.url + f"images/{scored}/explain.png", AUTH)
        assert status == 404 and b"switched off" in body and body.endswith(b"[explain_disabled]\n")
        assert explain_link(scored).encode() not in fetch(server.url + "results", AUTH)[2]
        assert fetch(server.url + f"images/{scored}/explain.png")[0] == 401
    finally:
        server.stop()


def test_a_model_that_cannot_be_loaded_is_named_with_its_reason_and_nothing_loads_tensorflow(
        cxr_dir: Path, tmp_path: Path) -> None:
    from db.migrate import upgrade
    from db.models import ModelVersion, Prediction
    from db.session import session_scope

    settings = embedded_settings(tmp_path / "data")
    upgrade(settings)
    with session_scope(settings) as session:
        broken = ModelVersion(name="covid-cxr", version="20261120-101500-aaaaaaaa", sha256="0" * 64, active=True,
                              artifact=b"not a model", metadata_json={"decision_threshold": 0.5})
        session.add(broken)
    corrupt, unregistered = record_instances(settings, chest_images(cxr_dir, 2))
    predict(settings, broken, [corrupt])
    with session_scope(settings) as session:  # a prediction whose model row is gone (no id, unknown version)
        session.add(Prediction(instance_id=unregistered, model_id=None, model_version="19990101-000000-gone",
                               preprocessing_version="cxr-norm-4", probabilities={"covid": 0.3, "normal": 0.7},
                               prob_covid=0.3, label="normal", threshold=0.5))
    with RunningWeb(settings, tmp_path / "web.log") as web:
        page = fetch(web.url + "results")[2].decode()
        assert explain_link(corrupt) in page
        status, _, body = fetch(web.url + f"images/{corrupt}/explain.png")
        assert status == 409 and body.endswith(b"[sha256_mismatch]\n")
        assert b"model covid-cxr 20261120-101500-aaaaaaaa, which scored this image, cannot be loaded" in body
        status, _, body = fetch(web.url + f"images/{unregistered}/explain.png")
        assert status == 404 and b"19990101-000000-gone" in body and body.endswith(b"[model_not_found]\n")
        maps = Path(f"/proc/{web.process.pid}/maps").read_text()
        assert not re.search(r"tensorflow|keras", maps), "pages or a failed heatmap loaded TensorFlow"
        assert web.stop() == 0


def test_requests_beyond_the_queue_are_told_to_come_back(cxr_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from db.migrate import upgrade
    from db.models import ModelVersion
    from db.session import session_scope
    from web.explain import MAX_WAITING, Heatmap, Heatmaps, HeatmapUnavailable

    settings = embedded_settings(tmp_path / "data")
    upgrade(settings)
    with session_scope(settings) as session:
        record = ModelVersion(name="covid-cxr", version="v1", sha256="0" * 64, artifact=b"", metadata_json={})
        session.add(record)
    (instance,) = record_instances(settings, chest_images(cxr_dir, 1))
    predict(settings, record, [instance])
    release, computing = threading.Event(), threading.Semaphore(0)

    def slow_compute(self: Heatmaps, image: np.ndarray, version: Any) -> Heatmap:
        computing.release()
        release.wait(30)
        return Heatmap(b"png", version.version, "block5_conv3")

    class ObservedLock:
        """The heatmaps' lock, counting the requests that reached it."""

        def __init__(self) -> None:
            self.lock, self.arrived = threading.Lock(), threading.Semaphore(0)

        def __enter__(self) -> None:
            self.arrived.release()
            self.lock.acquire()

        def __exit__(self, *exc_info: object) -> None:
            self.lock.release()

    monkeypatch.setattr(Heatmaps, "_compute", slow_compute)
    heatmaps = Heatmaps(settings)
    lock = heatmaps._lock = ObservedLock()  # type: ignore[assignment]
    results: list[Heatmap] = []
    threads = [threading.Thread(target=lambda: results.append(heatmaps.heatmap(instance)))
               for _ in range(MAX_WAITING + 1)]
    for thread in threads:
        thread.start()
    assert all(lock.arrived.acquire(timeout=30) for _ in threads)  # one computes, the others wait for the lock
    assert computing.acquire(timeout=30)
    with pytest.raises(HeatmapUnavailable) as refused:
        heatmaps.heatmap(instance)
    assert refused.value.status == 503 and refused.value.reason == "explain_busy"
    release.set()
    for thread in threads:
        thread.join(30)
    assert len(results) == MAX_WAITING + 1  # one after the other
    assert heatmaps.heatmap(instance).png == b"png"  # room again
