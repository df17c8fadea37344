"""A small installation with something on every dashboard page, made through the service's own code paths.

Files go through the real ingest path (read, record, quarantine), hostile names and header values
included; predictions are written by the worker's own ``store_predictions`` (with chosen
probabilities: no TensorFlow needed); labels are imported and the evaluation job runs for real.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service_fixtures import REPO_ROOT, changed_pixel_copy, wait_until

from covid_cxr.settings import Settings

#: A file name and a DICOM header value that would run a script if a page did not escape them.
HOSTILE_NAME = '<img src=x onerror="document.title=1">.dcm'
HOSTILE_BODY_PART = '<script>alert(1)</script>'
#: Chest radiographs that decode quickly, each a study of its own.
CHEST_FILES = (
    "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "dwv__gdcm-CR-MONO1-10-chest.dcm",
    "orthanc-tests__Monochrome1-Jpeg.dcm",
    "pylibjpeg-data__RG1_JLSN.dcm",
)
MR_FILE = "dcmfx-pydicom__MR_small_RLE.dcm"
#: The two registered versions; the second is active.
VERSIONS = ("20261120-101500-aaaaaaaa", "20261125-192837-b3c60495")
ACTIVATED_BY = f"covid-cxr models activate covid-cxr:{VERSIONS[1]}"


@dataclass
class Installation:
    settings: Settings
    accepted: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    study_uids: list[str] = field(default_factory=list)
    pseudonyms: list[str] = field(default_factory=list)


def build_installation(settings: Settings, dicom_dir: Path, work: Path) -> Installation:
    """Migrate ``settings``' database and fill it: models, accepted and rejected files, predictions, a report."""
    from db.migrate import upgrade

    upgrade(settings)
    _register_models(settings)
    installation = Installation(settings)
    _ingest(installation, dicom_dir, work)
    _predict(installation)
    _evaluate(installation)
    return installation


def _register_models(settings: Settings) -> None:
    from db.models import ModelVersion
    from db.session import session_scope
    from ingest.pixels import PREPROCESSING_VERSION
    from model_store.registry import activate, activation_note

    with session_scope(settings) as session:
        for index, version in enumerate(VERSIONS):
            test = {"n": 40 + index, "accuracy": {"value": 0.80 + index / 20}, "roc_auc": {"value": 0.85 + index / 20}}
            session.add(ModelVersion(
                name="covid-cxr", version=version, sha256=f"{index}" * 64, active=False, artifact=b"not loaded here",
                metadata_json={"decision_threshold": 0.5, "preprocessing_version": PREPROCESSING_VERSION,
                               "base_weights": {"source": "imagenet"}, "metrics": {"test": test}}))
    activate(settings, "covid-cxr", VERSIONS[0], activated_by=activation_note(f"covid-cxr models activate "
                                                                             f"covid-cxr:{VERSIONS[0]}"))
    activate(settings, "covid-cxr", VERSIONS[1], activated_by=activation_note(ACTIVATED_BY))


def _ingest(installation: Installation, dicom_dir: Path, work: Path) -> None:
    import pydicom
    from sqlalchemy import select

    from db.models import Study
    from db.session import session_scope
    from ingest.service import IngestService
    from taskqueue.producer import enqueue_batch, requeue_stale

    settings = installation.settings
    inbox = settings.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    drops: list[tuple[str, Path]] = []
    for name in CHEST_FILES:
        drops.append((name, shutil.copyfile(dicom_dir / name, inbox / name)))
    drops.append(("hostile-name", shutil.copyfile(dicom_dir / MR_FILE, inbox / HOSTILE_NAME)))
    hostile = pydicom.dcmread(dicom_dir / "dwv__gdcm-CR-MONO1-10-chest.dcm")
    hostile.BodyPartExamined = HOSTILE_BODY_PART
    hostile.SOPInstanceUID = "2.25.1234567890123456789"
    hostile.save_as(inbox / "hostile-header.dcm")
    drops.append(("hostile-header", inbox / "hostile-header.dcm"))
    (inbox / "notes.dcm").write_text("not a DICOM file\n")
    drops.append(("not-dicom", inbox / "notes.dcm"))
    changed_pixel_copy(dicom_dir / "dwv__gdcm-CR-MONO1-10-chest.dcm", inbox / "resent" / "edited-chest.dcm")
    drops.append(("conflict", inbox / "resent" / "edited-chest.dcm"))

    service = IngestService(settings, enqueue=enqueue_batch, requeue=requeue_stale)
    for key, path in drops:
        outcome = service.process_file(path)
        assert outcome is not None, key
        if key in CHEST_FILES:
            assert outcome.state.value == "received", (key, outcome.state, outcome.reason)
            installation.accepted.append(outcome.instance_id)
        else:
            assert outcome.state.value == "rejected", (key, outcome.state)
            installation.rejected[key] = outcome.instance_id
    service.batcher.flush(force=True)
    with session_scope(settings) as session:
        studies = session.execute(select(Study.study_instance_uid, Study.patient_pseudonym)).all()
    installation.study_uids = [uid for uid, _ in studies]
    installation.pseudonyms = [pseudonym for _, pseudonym in studies if pseudonym]


def _predict(installation: Installation) -> None:
    import numpy as np

    from ingest.pixels import PREPROCESSING_VERSION
    from model_store.registry import get_active
    from worker.inference import LoadedModel
    from worker.tasks import claim_instances, store_predictions

    settings = installation.settings
    record = get_active(settings, "covid-cxr")
    model = LoadedModel(model=None, model_id=record.id, name=record.name, version=record.version,
                        sha256=record.sha256, threshold=0.5, class_names=("covid", "normal"), positive_class="covid",
                        preprocessing_version=PREPROCESSING_VERSION)
    claimed, _ = claim_instances(settings, installation.accepted)
    covid = np.linspace(0.9, 0.1, len(claimed))
    store_predictions(settings, model, "batch-1", claimed, np.stack([covid, 1 - covid], axis=1), forward_ms=480.0)


def _evaluate(installation: Installation) -> None:
    from sqlalchemy import select

    from db.labels import import_labels
    from db.models import Instance
    from db.session import session_scope
    from worker.evaluation import run_evaluation

    with session_scope(installation.settings) as session:
        uids = session.scalars(select(Instance.sop_instance_uid).where(Instance.id.in_(installation.accepted))
                               .order_by(Instance.id)).all()
    rows = ["SOPInstanceUID,label,source,date"]
    rows += [f"{uid},{'covid' if i % 2 == 0 else 'normal'},rt-pcr,2026-11-25" for i, uid in enumerate(uids)]
    result = import_labels(installation.settings, "\n".join(rows).encode(), "labels.csv")
    assert result.added == len(uids), result
    assert run_evaluation(installation.settings, "all")


# --- a running `covid-cxr web` -------------------------------------------------------------------------


class RunningWeb:
    """``covid-cxr web`` as an operator starts it (its own process, logging to a file), on a free port."""

    def __init__(self, settings: Settings, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        import os

        argv = [sys.executable, "-m", "covid_cxr", "web", "--data-dir", str(settings.data_dir), "--port", "0", *args]
        if settings.database_url:
            argv += ["--database-url", settings.database_url]
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                            env={**os.environ, **(env or {})})
        match = wait_until(self._started, timeout=60, what="covid-cxr web to listen")
        self.url = match.group(1)

    def _started(self) -> Any:
        if self.process.poll() is not None:
            raise AssertionError(f"covid-cxr web exited with {self.process.returncode}:\n{self.log()}")
        return re.search(r"dashboard on (http://\S+/)", self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def __enter__(self) -> RunningWeb:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


# --- reading the HTTP endpoints ------------------------------------------------------------------------


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of a GET; error statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed as Prometheus does: ``{(sample name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = fetch(url.rstrip("/") + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4"), (status, body[:500])
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def listening_url(log: str, name: str) -> str | None:
    """The URL a command logged for its ``dashboard`` or ``probes`` server, once it did."""
    match = re.search(rf"{name} on (http://\S+/)", log)
    return match.group(1) if match else None
