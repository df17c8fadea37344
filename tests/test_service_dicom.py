"""End to end over the DICOM network: a modality sends chest films to `covid-cxr serve`, the real model classifies
them, and the study's Structured Report arrives at a PACS (a pynetdicom SCP) - then a new version when the study grows.

One ``serve`` process (watcher, receiver, outbox, a real worker with the Keras VGG16 of random weights) and
three small images: the wiring is under test, not the accuracy.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

import highdicom as hd
import pydicom
import pytest
from dicom_results import SMALL_CHEST, StoreSCP, chest_copy, free_port, require_tools, run_tool
from pydicom.uid import generate_uid
from pynetdicom import AE
from service_fixtures import REPO_ROOT, embedded_settings, wait_until
from sqlalchemy import select

from db.models import Instance, Prediction
from db.session import session_scope
from delivery.content import COVID_PROBABILITY

pytestmark = pytest.mark.slow

SCP_TITLE = "COVID_CXR"


def latest_report(pacs: StoreSCP, study_uid: str, images: int) -> hd.sr.ComprehensiveSR | None:
    """The newest report of ``study_uid`` the PACS holds, once it references ``images`` images."""
    reports = [d for d in pacs.received if d.StudyInstanceUID == study_uid]
    if not reports:
        return None
    newest = hd.sr.ComprehensiveSR.from_dataset(max(reports, key=lambda d: int(d.InstanceNumber)))
    return newest if len(newest.get_evidence()) == images else None


def test_images_sent_over_dicom_come_back_as_versioned_reports(tmp_path, dicom_dir, active_model, capsys):
    require_tools("storescu", "dciodvfy")
    from service.cli import main

    settings = embedded_settings(tmp_path / "data", inbox_dir=tmp_path / "inbox")
    model = active_model.register(settings)
    study_uid, port = generate_uid(), free_port()
    films = [chest_copy(dicom_dir / SMALL_CHEST, tmp_path / "modality" / f"{n}.dcm", study_uid=study_uid,
                        view_position=view) for n, view in enumerate(["PA", "AP", "AP"])]
    with StoreSCP(ae_title="PACS") as pacs:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COVID_CXR_SETTLE_SECONDS": "0.5",
               "COVID_CXR_BATCH_MAX_WAIT_SECONDS": "0.5", "COVID_CXR_DICOM_PORT": str(port),
               "COVID_CXR_DICOM_BIND_ADDRESS": "127.0.0.1", "COVID_CXR_DICOM_ALLOWED_CALLERS": "STORESCU,MODALITY",
               "COVID_CXR_DICOM_DESTINATIONS": f"pacs=PACS@127.0.0.1:{pacs.port}",
               "COVID_CXR_DELIVERY_POLL_SECONDS": "0.5"}
        log_path = tmp_path / "serve.log"
        with log_path.open("ab") as log:
            serve = subprocess.Popen(
                [sys.executable, "-m", "covid_cxr", "serve", "--data-dir", str(settings.data_dir), "--inbox",
                 str(settings.inbox)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                start_new_session=True)

        def serve_log(needle: str) -> re.Match[str] | None:
            text = log_path.read_text(errors="replace")
            if serve.poll() is not None:
                raise AssertionError(f"serve exited with {serve.returncode}:\n{text[-4000:]}")
            return re.search(needle, text)

        worker_pid: int | None = None
        try:
            wait_until(lambda: serve_log(r"DICOM receiver COVID_CXR listening on 127\.0\.0\.1:\d+"), timeout=120,
                       what="the receiver")
            worker_pid = int(wait_until(lambda: serve_log(r"worker process (\d+) started"), timeout=120).group(1))
            # A modality sends the first two films with DCMTK ...
            sent = run_tool("storescu", "-aet", "STORESCU", "-aec", SCP_TITLE, "127.0.0.1", str(port),
                            *(str(tmp_path / "modality" / f"{n}.dcm") for n in (0, 1)))
            assert sent.returncode == 0, sent.stdout
            first = wait_until(lambda: latest_report(pacs, study_uid, 2), timeout=240,
                               what="a report over both films at the PACS")
            # ... and later a third film of the same study with pynetdicom.
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(films[2].SOPClassUID, films[2].file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", port, ae_title=SCP_TITLE)
            assert assoc.is_established
            assert assoc.send_c_store(tmp_path / "modality" / "2.dcm").Status == 0x0000
            assoc.release()
            second = wait_until(lambda: latest_report(pacs, study_uid, 3), timeout=120,
                                what="a new report version over all three films")
            assert main(["status", "--data-dir", str(settings.data_dir)]) == 0
            status = capsys.readouterr().out
            serve.send_signal(signal.SIGINT)
            assert serve.wait(90) == 0
        finally:
            for pid in (serve.pid, worker_pid):
                with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
                    os.killpg(pid, signal.SIGKILL)  # type: ignore[arg-type]
            serve.wait(30)

    assert {uid[2] for uid in second.get_evidence()} == {film.SOPInstanceUID for film in films}
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
    with session_scope(settings) as session:
        probabilities = dict(session.execute(
            select(Instance.sop_instance_uid, Prediction.prob_covid)
            .join(Prediction, Prediction.instance_id == Instance.id)).all())
    group = second.content.get_image_measurement_groups()[0]
    reported = {m.name.meaning: m.value for m in group.get_measurements()}[COVID_PROBABILITY.meaning]
    assert reported == pytest.approx(max(probabilities.values()), abs=1e-6)
    assert any(model.version in item.get("SoftwareVersions", []) for item in second.ContributingEquipmentSequence)
    path = tmp_path / "report.dcm"
    pydicom.dcmwrite(path, second, enforce_file_format=True)
    checked = run_tool("dciodvfy", str(path))
    assert [line for line in checked.stdout.splitlines() if line.startswith("Error")] == []
    assert re.search(r"outbox       pending 0 · delivered \d+ · dead 0", status), status
    assert f"-> STORESCU/{films[0].SOPInstanceUID}.dcm" in log_path.read_text()
