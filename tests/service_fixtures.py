"""Fixtures and helpers for tests of the running service: a real model in the registry, real worker processes, waiting.

Loaded as a pytest plugin from ``conftest.py``; helpers are importable with ``from service_fixtures import ...``.

* ``active_model`` (session): a Keras VGG16 (base weights none) saved once as an artifact;
  ``active_model.register(settings)`` upgrades that database, imports and activates it.
* :func:`start_worker`: a real ``covid-cxr worker`` subprocess, ready when the context is entered,
  stopped (SIGTERM, then SIGKILL) when it is left.
* :func:`wait_until`: poll a predicate with a deadline.
* :func:`record_instances` and :func:`chest_images`: what the ingester would have recorded,
  for worker tests that do not go through the inbox.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from covid_cxr.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Celery's log line once a worker consumes.
WORKER_READY = " ready."
#: Log lines of :mod:`worker.tasks` a test can wait for.
MODEL_LOADED = "loaded model"
FORWARD_PASS_STARTED = "running model"

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.2, what: str | None = None) -> T:
    """Call ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


# --- settings ------------------------------------------------------------------------------------


def embedded_settings(data_dir: Path, **overrides: Any) -> Settings:
    """The embedded default (SQLite and the filesystem broker under ``data_dir``)."""
    return load_settings(data_dir=data_dir, **overrides)


def distributed_settings(data_dir: Path, database_url: str, broker_url: str, **overrides: Any) -> Settings:
    """PostgreSQL and Redis; ``data_dir`` still holds the model cache and logs."""
    return load_settings(data_dir=data_dir, database_url=database_url, broker_url=broker_url, **overrides)


# --- the model -----------------------------------------------------------------------------------


@dataclass
class ActiveModel:
    """A saved artifact that any test database can import and activate."""

    artifact: Any  # model_store.artifact.ArtifactInfo

    @property
    def version(self) -> str:
        return self.artifact.version

    def register(self, settings: Settings) -> Any:
        """Upgrade ``settings``' database to head, import the artifact and make it the active model."""
        from db.migrate import upgrade
        from model_store.registry import import_artifact

        upgrade(settings)
        return import_artifact(settings, self.artifact.directory, activate=True)

    __call__ = register


@pytest.fixture(scope="session")
def model_artifact(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``build_model(None)`` (random weights: enough to wire and time the pipeline) saved once per session."""
    from covid_cxr.constants import CLASS_NAMES, MODEL_NAME, POSITIVE_CLASS
    from ingest.pixels import PREPROCESSING_VERSION
    from model_store.architecture import ARCHITECTURE, build_model
    from model_store.artifact import save_artifact
    from model_store.weights import describe_base_weights

    model = build_model(None)
    metadata = {
        "name": MODEL_NAME,
        "architecture": ARCHITECTURE,
        "base_weights": describe_base_weights(None),
        "preprocessing_version": PREPROCESSING_VERSION,
        "class_names": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "decision_threshold": 0.5,
        "notes": "untrained test model (random weights)",
    }
    return save_artifact(model, metadata, tmp_path_factory.mktemp("model") / "artifact")


@pytest.fixture(scope="session")
def active_model(model_artifact: Any) -> ActiveModel:
    return ActiveModel(model_artifact)


# --- what the ingester records -------------------------------------------------------------------


def chest_images(cxr_dir: Path, count: int) -> list[np.ndarray]:
    """``count`` real chest radiographs (alternating covid/normal folders) normalized to 224x224 uint8."""
    from ingest.pixels import load_image_file, normalize_grayscale

    folders = [sorted((cxr_dir / label).glob("*")) for label in ("covid", "normal")]
    paths = [folders[i % 2][i // 2] for i in range(count)]
    return [normalize_grayscale(load_image_file(path)) for path in paths]


def encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def record_instances(settings: Settings, images: Sequence[np.ndarray | bytes], *, study_uid: str | None = None,
                     view_positions: Sequence[str | None] | None = None, state: str = "received",
                     preprocessing_version: str | None = None) -> list[int]:
    """Record one study with one instance per image, as the ingester does (images given as arrays or PNG bytes)."""
    from db.models import Instance, NormalizedImage, Study
    from db.session import session_scope

    if preprocessing_version is None:
        from ingest.pixels import PREPROCESSING_VERSION as preprocessing_version
    study_uid = study_uid or f"2.25.{uuid.uuid4().int}"
    views = list(view_positions) if view_positions is not None else ["PA"] * len(images)
    ids = []
    with session_scope(settings) as session:
        study = Study(study_instance_uid=study_uid)
        session.add(study)
        session.flush()
        for image, view in zip(images, views, strict=True):
            png = image if isinstance(image, bytes) else encode_png(image)
            instance = Instance(
                state=state, file_name=f"{study_uid}/{len(ids)}.dcm", file_sha256=hashlib.sha256(png).hexdigest(),
                study_id=study.id, study_instance_uid=study_uid, sop_instance_uid=f"2.25.{uuid.uuid4().int}",
                modality="DX", view_position=view, body_part_examined="CHEST",
            )
            session.add(instance)
            session.flush()
            pixels = None if isinstance(image, bytes) else image
            session.add(NormalizedImage(
                instance_id=instance.id, preprocessing_version=preprocessing_version,
                png=png, mean=None if pixels is None else float(pixels.mean()),
                std=None if pixels is None else float(pixels.std()),
            ))
            ids.append(instance.id)
    return ids


def instance_states(settings: Settings, ids: Sequence[int]) -> dict[int, str]:
    from sqlalchemy import select

    from db.models import Instance
    from db.session import session_scope

    with session_scope(settings) as session:
        return dict(session.execute(select(Instance.id, Instance.state).where(Instance.id.in_(ids))).all())


def prediction_counts(settings: Settings, ids: Sequence[int]) -> dict[int, int]:
    """Prediction rows per instance (0 included), over every model version."""
    from sqlalchemy import func, select

    from db.models import Prediction
    from db.session import session_scope

    with session_scope(settings) as session:
        counts = dict(session.execute(
            select(Prediction.instance_id, func.count()).where(Prediction.instance_id.in_(ids))
            .group_by(Prediction.instance_id)).all())
    return {i: counts.get(i, 0) for i in ids}


# --- worker processes ----------------------------------------------------------------------------


class WorkerProcess:
    """A running ``covid-cxr worker`` (its own process group) and its log file."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 120.0, count: int = 1) -> None:
        """Wait until ``needle`` appears ``count`` times in the log; fail at once if the worker exits."""
        def seen() -> bool:
            if not self.alive:
                raise AssertionError(f"worker exited with {self.process.returncode} before logging {needle!r}:\n"
                                     + self.log_text()[-4000:])
            return self.log_text().count(needle) >= count

        wait_until(seen, timeout=timeout, interval=0.05, what=f"{needle!r} in {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): no cleanup, no acknowledgement."""
        if self.alive:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM to the main process: the current task finishes), then SIGKILL after ``timeout``.

        Only the main process gets SIGTERM: it stops its pool itself, whereas a pool process
        terminated behind its back would be replaced by a new one.
        """
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self.process.wait()


@contextmanager
def start_worker(settings: Settings, queues: Sequence[str] | None = None, *, concurrency: int = 1,
                 pool: str = "prefork", beat: bool = False, log_path: Path | None = None,
                 wait_for: Sequence[str] = (WORKER_READY,), ready_timeout: float = 180.0,
                 env: dict[str, str] | None = None) -> Iterator[WorkerProcess]:
    """Start a real worker subprocess for ``settings`` and wait until it logged every line in ``wait_for``.

    ``queues`` defaults to the inference queue. Pass ``wait_for=(WORKER_READY, MODEL_LOADED)`` to
    wait until the pool process has loaded the model too. The worker is stopped on exit.
    """
    from service.worker_command import worker_command

    argv, handed_over = worker_command(settings, list(queues or [settings.inference_queue]),
                                       concurrency=concurrency, beat=beat, pool=pool, loglevel="INFO")
    log_path = log_path or settings.data_dir / f"worker-{uuid.uuid4().hex[:8]}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **handed_over, **(env or {})}
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=child_env,
                                   start_new_session=True)
    worker = WorkerProcess(process, log_path)
    try:
        for needle in wait_for:
            worker.wait_for_log(needle, timeout=ready_timeout)
        yield worker
    finally:
        worker.stop()


@pytest.fixture(params=["embedded", "distributed"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Migrated settings for each deployment: SQLite + folder broker, and PostgreSQL + Redis."""
    from db.migrate import upgrade

    if request.param == "embedded":
        settings = embedded_settings(tmp_path)
    else:
        settings = distributed_settings(tmp_path, request.getfixturevalue("postgres_url"),
                                        request.getfixturevalue("redis_url"))
    upgrade(settings)
    return settings


class RecordingPublisher:
    """Stands in for the broker where a test needs no worker: records batches, or refuses them while ``down``."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.requeues = 0
        self.down = False

    def enqueue(self, settings: Settings, ids: Sequence[int]) -> bool:
        if self.down:
            return False
        self.batches.append(list(ids))
        return True

    def requeue(self, settings: Settings) -> int:
        self.requeues += 1
        return 0


class RunningIngester:
    """The ingest loop of ``covid-cxr ingest`` in a thread of the test process (or the ``service`` given)."""

    def __init__(self, settings: Settings, service: Any = None) -> None:
        from ingest.service import IngestService
        from taskqueue.producer import enqueue_batch, requeue_stale

        self.service = service or IngestService(settings, enqueue=enqueue_batch, requeue=requeue_stale,
                                                progress_interval=1.0)
        self.thread = threading.Thread(target=self.service.run, name="ingester")

    def __enter__(self) -> Any:
        self.thread.start()
        assert self.service.started.wait(30)
        return self.service

    def __exit__(self, *exc_info: object) -> None:
        self.service.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()


def changed_pixel_copy(source: Path, target: Path) -> None:
    """The same SOP instance with one pixel changed (a re-export after an edit)."""
    import pydicom

    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] ^= 1
    ds.PixelData = pixels.tobytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
