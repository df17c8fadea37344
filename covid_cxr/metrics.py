"""The Prometheus collectors the ingester and the workers update, named ``covid_cxr_<what>_<unit>``.

Imports only ``prometheus_client``, so that ``ingest`` and ``worker`` can both record here. Each
process kind has a registry of its own (:data:`INGEST_REGISTRY`, :data:`WORKER_REGISTRY`): a
``/metrics`` page shows the families of the processes behind it and never the same family twice.

Celery's prefork pool counts in child processes: a worker runs in ``prometheus_client``'s
multiprocess mode, which each process must enter *before* it imports ``prometheus_client``
(:data:`MULTIPROCESS_ENV` in its environment; the commands that start workers take care of it).
The gauges that describe the whole installation (files by state, queue depth, report age, disk
free) are read from the database when scraped, in :mod:`web.metrics`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

#: The environment variable that puts ``prometheus_client`` in multiprocess mode: a folder of per-process files.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: What a ``/metrics`` response is.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Label value when a file has no readable transfer syntax, reason or model version.
NONE_LABEL = "none"

INGEST_REGISTRY = CollectorRegistry(auto_describe=True)
WORKER_REGISTRY = CollectorRegistry(auto_describe=True)

INGESTED_FILES = Counter(
    "covid_cxr_ingested_files", "Files this ingester read and recorded, by the state they got and their reason code",
    ["state", "reason"], registry=INGEST_REGISTRY)
DECODE_SECONDS = Histogram(
    "covid_cxr_decode_seconds", "Seconds to read, decode and normalize one file, by its TransferSyntaxUID",
    ["transfer_syntax"], registry=INGEST_REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
BATCH_SIZE = Histogram(
    "covid_cxr_batch_size_images", "Images in one forward pass of the model",
    registry=WORKER_REGISTRY, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
INFERENCE_SECONDS = Histogram(
    "covid_cxr_inference_seconds", "Seconds of one forward pass over a batch, by model version",
    ["model_version"], registry=WORKER_REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0))
PREDICTIONS = Counter(
    "covid_cxr_predictions", "Predictions written, by model version", ["model_version"], registry=WORKER_REGISTRY)

#: What a label value may look like: DICOM UIDs, reason codes, model versions; anything else is shown as ``other``.
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._:+-]{1,64}")


def label_value(value: str | None) -> str:
    """``value`` as a label: :data:`NONE_LABEL` when missing, ``other`` when it is not a short plain token."""
    if not value:
        return NONE_LABEL
    return value if _LABEL_VALUE.fullmatch(value) else "other"


def file_ingested(state: str, reason: str | None, transfer_syntax: str | None, decode_seconds: float) -> None:
    """Count one file the ingester recorded and how long reading it took."""
    INGESTED_FILES.labels(state=state, reason=label_value(reason)).inc()
    DECODE_SECONDS.labels(transfer_syntax=label_value(transfer_syntax)).observe(decode_seconds)


def batch_predicted(model_version: str, images: int, forward_seconds: float) -> None:
    """Count one committed batch: its size, its forward pass and its predictions."""
    version = label_value(model_version)
    BATCH_SIZE.observe(images)
    INFERENCE_SECONDS.labels(model_version=version).observe(forward_seconds)
    PREDICTIONS.labels(model_version=version).inc(images)


def in_multiprocess_mode() -> bool:
    """Whether this process writes its values to per-process files (it entered multiprocess mode in time)."""
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


def exposition(registries: Iterable[CollectorRegistry] = (), *, multiprocess_dir: Path | None = None,
               collectors: Iterable[Collector] = ()) -> bytes:
    """The text of one ``/metrics`` response.

    Parameters
    ----------
    registries
        This process's own registries, read from memory.
    multiprocess_dir
        A folder of multiprocess files (the worker's pool processes) to add up and include.
    collectors
        Collectors computed when scraped (the installation's gauges).
    """
    combined = CollectorRegistry()
    for registry in registries:
        combined.register(registry)
    if multiprocess_dir is not None:
        MultiProcessCollector(combined, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
    for collector in collectors:
        combined.register(collector)
    return generate_latest(combined)


def multiprocess_dir_from_environment() -> Path | None:
    """The multiprocess folder this process writes to, if it was started in multiprocess mode."""
    value = os.environ.get(MULTIPROCESS_ENV)
    return Path(value) if value and in_multiprocess_mode() else None
