"""The probe endpoints of ``covid-cxr ingest`` and ``covid-cxr worker`` (``--probe-port``): health, readiness."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from service_fixtures import REPO_ROOT, embedded_settings, start_worker, wait_until
from web_fixtures import fetch, listening_url, scrape

SIIM = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MR = "dcmfx-pydicom__MR_small_RLE.dcm"


def test_ingest_answers_probes_and_counts_what_it_read(tmp_path: Path, dicom_dir: Path) -> None:
    settings = embedded_settings(tmp_path / "data")
    log_path = tmp_path / "ingest.log"
    argv = [sys.executable, "-m", "covid_cxr", "ingest", "--data-dir", str(settings.data_dir), "--probe-port", "0",
            "--settle-seconds", "0.2"]
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=os.environ.copy())
    try:
        url = wait_until(lambda: listening_url(log_path.read_text(), "probes"), timeout=60, what="ingest's probes")
        assert fetch(url + "healthz")[:1] == (200,)
        status, _, body = fetch(url + "readyz")
        ready = json.loads(body)
        assert status == 200 and ready["required"] == ["database", "broker"] and ready["ready"]
        assert ready["checks"]["model"].endswith("[no_active_model]")  # reported, not required of an ingester
        for name in (SIIM, MR):
            shutil.copyfile(dicom_dir / name, settings.inbox / f".{name}.part")
            os.rename(settings.inbox / f".{name}.part", settings.inbox / name)

        def counted() -> dict | None:
            samples = scrape(url)
            ingested = {labels: value for (name, labels), value in samples.items()
                        if name == "covid_cxr_ingested_files_total"}
            return samples if sum(ingested.values()) == 2 else None

        samples = wait_until(counted, timeout=60, what="two files counted")
        assert samples[("covid_cxr_ingested_files_total", (("reason", "none"), ("state", "received")))] == 1
        assert samples[("covid_cxr_ingested_files_total", (("reason", "wrong_modality"), ("state", "rejected")))] == 1
        assert samples[("covid_cxr_decode_seconds_count", (("transfer_syntax", "1.2.840.10008.1.2.4.50"),))] == 1
        assert samples[("covid_cxr_decode_seconds_count", (("transfer_syntax", "1.2.840.10008.1.2.5"),))] == 1
        assert not any(name.startswith("covid_cxr_predictions") for name, _ in samples)  # a worker's, not ours
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log_path.read_text()[-3000:]


def test_a_worker_without_a_model_is_alive_but_not_ready(tmp_path: Path) -> None:
    from db.migrate import upgrade

    settings = embedded_settings(tmp_path / "data")
    upgrade(settings)
    with start_worker(settings, pool="solo", env={"COVID_CXR_PROBE_PORT": "0"}) as worker:
        url = listening_url(worker.log_text(), "probes")
        assert url is not None
        assert fetch(url + "healthz")[0] == 200
        status, _, body = fetch(url + "readyz")
        ready = json.loads(body)
        assert status == 503 and not ready["ready"]
        assert ready["checks"]["database"] == "ok" and ready["checks"]["broker"] == "ok"
        assert "no_active_model" in ready["checks"]["model"]
        folder = settings.data_dir / "metrics" / f"worker-{url.rstrip('/').rsplit(':', 1)[1]}"
        assert folder.is_dir(), "the worker counts in its own multiprocess folder"
        assert scrape(url)[("covid_cxr_database_up", ())] == 1
