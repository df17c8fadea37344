"""Test helper: chest radiographs of one study as the ingester records them, predicted as the worker would.

No model and no worker process: :func:`predict` writes predictions and study results with the
worker's own :func:`worker.tasks.store_predictions`, so study results follow the worker's rule.
"""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from covid_cxr.settings import Settings

#: A small uncompressed CR chest film (440 x 440): fast to read and normalize.
SMALL_CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"
MODEL_VERSION = "20261129-120000-testtest"
MODEL_SHA256 = "ab" * 32


def chest_copy(source: Path, target: Path, *, study_uid: str, patient_id: str = "PAT-001",
               patient_name: str = "Doe^Jane", view_position: str = "PA") -> pydicom.Dataset:
    """``source`` as a new instance of ``study_uid`` (new series and SOP Instance UIDs), written to ``target``."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.PatientName, ds.ViewPosition = patient_id, patient_name, view_position
    ds.AccessionNumber = "ACC-" + study_uid[-8:]
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return ds


def ingest_files(settings: Settings, paths: Sequence[Path]) -> list[int]:
    """Read, record and archive ``paths`` (inbox files) with the real ingester; returns the instance ids."""
    from ingest.service import IngestService

    service = IngestService(settings, enqueue=lambda _settings, _ids: True, requeue=lambda _settings: 0)
    ids = []
    for path in paths:
        outcome = service.process_file(path)
        assert outcome is not None and outcome.enqueue, (path, outcome)
        ids.append(outcome.instance_id)
    return ids


def register_model(settings: Settings, version: str = MODEL_VERSION) -> int:
    """A ``models`` row as the registry writes it (no artifact bytes: nothing loads it)."""
    from db.models import ModelVersion
    from db.session import session_scope
    from ingest.pixels import PREPROCESSING_VERSION

    with session_scope(settings) as session:
        record = ModelVersion(name="covid-cxr", version=version, sha256=MODEL_SHA256, active=True,
                              metadata_json={"preprocessing_version": PREPROCESSING_VERSION,
                                             "decision_threshold": 0.5},
                              artifact=b"")
        session.add(record)
        session.flush()
        return record.id


def predict(settings: Settings, instance_ids: Sequence[int], prob_covid: Sequence[float], *, model_id: int,
            version: str = MODEL_VERSION) -> None:
    """Write predictions (and recompute study results) exactly as the worker's task does after a forward pass."""
    import numpy as np
    from sqlalchemy import select

    from db.models import Instance, NormalizedImage
    from db.session import session_scope
    from worker.inference import LoadedModel
    from worker.tasks import ClaimedInstance, store_predictions

    model = LoadedModel(model=None, model_id=model_id, name="covid-cxr", version=version, sha256=MODEL_SHA256,
                        threshold=0.5, class_names=("covid", "normal"), positive_class="covid",
                        preprocessing_version=None)
    with session_scope(settings) as session:
        rows = session.execute(
            select(Instance.id, Instance.attempts, Instance.created_at, Instance.study_id,
                   NormalizedImage.preprocessing_version)
            .join(NormalizedImage, NormalizedImage.instance_id == Instance.id)
            .where(Instance.id.in_(list(instance_ids))).order_by(Instance.id)).all()
    items = [ClaimedInstance(row.id, row.attempts, row.created_at, row.study_id, None, row.preprocessing_version)
             for row in rows]
    by_id = dict(zip(instance_ids, prob_covid, strict=True))
    probabilities = np.array([[by_id[item.instance_id], 1.0 - by_id[item.instance_id]] for item in items])
    store_predictions(settings, model, uuid.uuid4().hex, items, probabilities, forward_ms=10.0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require_tools(*names: str) -> None:
    """Skip (fail under CI) unless every tool in ``names`` is installed (scripts/setup.sh installs them)."""
    import shutil

    from conftest import _unavailable

    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} (apt-get install dcmtk dicom3tools)")


def run_tool(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a DICOM command-line tool; returns its exit status and output (stdout and stderr together)."""
    return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


class StoreSCP:
    """A pynetdicom storage SCP for SR documents on 127.0.0.1: a destination the test controls.

    ``received`` holds every dataset stored (with its file meta); ``status`` is what C-STORE answers.
    """

    def __init__(self, port: int = 0, ae_title: str = "PACS", *, status: int = 0x0000,
                 require_calling: str | None = None) -> None:
        from pydicom.uid import (
            ComprehensiveSRStorage,
            EnhancedSRStorage,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
        )
        from pynetdicom import AE, evt

        self.received: list[pydicom.Dataset] = []
        self.status = status
        self.ae = AE(ae_title=ae_title)
        for sop_class in (ComprehensiveSRStorage, EnhancedSRStorage):
            self.ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if require_calling:
            self.ae.require_calling_aet = [require_calling]
        server = self.ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])

    def _on_store(self, event: Any) -> int:
        if self.status == 0x0000:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            self.received.append(dataset)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
