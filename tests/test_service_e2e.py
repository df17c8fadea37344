"""End to end with real components: watchdog, a slow writer, SQLite or PostgreSQL, the folder broker or Redis,
real worker processes and the real Keras VGG16 (random weights: the wiring is under test, not the accuracy).

Every file dropped ends in exactly one terminal state; accepted images get exactly one prediction,
rejects are quarantined with their reason; restarts, duplicates, conflicts and a broker outage lose
nothing and predict nothing twice. Few images go through the model (it runs ~4 images/s on 2 cores).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from fresh_copies import with_fresh_uids, write_fresh_copies
from pydicom.uid import generate_uid
from service_fixtures import (
    REPO_ROOT,
    RunningIngester,
    changed_pixel_copy,
    distributed_settings,
    embedded_settings,
    start_worker,
    wait_until,
)
from sqlalchemy import func, select
from web_fixtures import fetch, listening_url, scrape

from covid_cxr.reasons import Reason
from db.models import Instance, InstanceState, Prediction
from db.session import session_scope
from ingest.inbox import read_reason, reason_path

pytestmark = pytest.mark.slow

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: Files of ../shared/data/dicom the reader must reject, with the reason (everything else is a chest radiograph).
EXPECTED_REJECTS = {
    "dcmfx-pydicom__MR_small_RLE.dcm": "wrong_modality",
    "fo-dicom__CR-ModalitySequenceLUT.dcm": "wrong_body_part",  # a shoulder: the description says so
    "fo-dicom__GH133.dcm": "wrong_modality",
    "orthanc-tests__KarstenHilbertRF.dcm": "wrong_modality",
    "pydicom-data__RG3_J2KR.dcm": "wrong_body_part",
    "pylibjpeg-data__NM_Kakadu44_SOTmarkerincons.dcm": "wrong_body_part",
    "pylibjpeg-data__RG2_JLSL.dcm": "wrong_body_part",
    "pylibjpeg-data__RG2_JPLL.dcm": "wrong_body_part",
    "pylibjpeg-data__RG2_JPLY_fixed.dcm": "wrong_body_part",
}
SIIM = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
UNCOMPRESSED_CHEST = "dwv__gdcm-CR-MONO1-10-chest.dcm"

#: Short timings so a test waits seconds, not the production defaults.
FAST = {"settle_seconds": 1.0, "reconcile_interval_seconds": 2.0, "batch_max_wait_seconds": 0.5, "batch_size": 4}
TERMINAL = {s for s in InstanceState if s.terminal}


# --- helpers -------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def slow_copy(source: Path, target: Path, chunk: int = 256 * 1024, pause: float = 0.1) -> None:
    """Write ``target`` in chunks with pauses shorter than the settle time, like a slow network copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    with open(target, "wb") as handle:
        for start in range(0, len(data), chunk):
            handle.write(data[start:start + chunk])
            handle.flush()
            time.sleep(pause)


class SlowWriter(threading.Thread):
    """Drops ``(source, relative name)`` pairs into the inbox one after another, slowly."""

    def __init__(self, inbox: Path, files: Sequence[tuple[Path, str]]) -> None:
        super().__init__(name="slow-writer")
        self.inbox, self.files = inbox, list(files)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for source, rel in self.files:
                slow_copy(source, self.inbox / rel)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def finish(self, timeout: float = 120.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the slow writer did not finish"
        if self.error:
            raise self.error


def rows_by_name(settings) -> dict[str, Instance]:
    with session_scope(settings) as session:
        rows = session.scalars(select(Instance).order_by(Instance.id)).all()
    by_name: dict[str, Instance] = {}
    for row in rows:
        assert row.file_name not in by_name, f"{row.file_name} recorded twice"
        by_name[row.file_name] = row
    return by_name


def predictions_per_instance(settings) -> dict[int, int]:
    with session_scope(settings) as session:
        return {instance_id: n for instance_id, n in
                session.execute(select(Prediction.instance_id, func.count()).group_by(Prediction.instance_id))}


def wait_all_terminal(settings, names: set[str], timeout: float = 180.0) -> dict[str, Instance]:
    def done() -> dict[str, Instance] | None:
        rows = rows_by_name(settings)
        if set(rows) >= names and all(rows[n].state in TERMINAL for n in names):
            return rows
        return None

    return wait_until(done, timeout=timeout, interval=0.5, what=f"{len(names)} files in a terminal state")


def docs_operator_sql() -> list[str]:
    """The ```sql blocks of the "Operator queries" section of docs/sql.md."""
    page = (REPO_ROOT / "docs" / "sql.md").read_text()
    section = page.split("\n## Operator queries\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def assert_docs_sql_runs(settings) -> None:
    """Every operator query of docs/sql.md runs on this database (SQLite or PostgreSQL)."""
    from sqlalchemy import text

    from db.session import create_engine_for

    queries = docs_operator_sql()
    assert len(queries) >= 5
    with create_engine_for(settings).connect() as connection:
        for query in queries:
            connection.execute(text(query)).all()


def assert_outcomes(settings, rows: dict[str, Instance], expected: dict[str, str], sources: dict[str, Path],
                    model_version: str) -> None:
    """States and reasons as expected, one prediction per predicted image, every file where its row says."""
    predictions = predictions_per_instance(settings)
    for name, want in expected.items():
        row = rows[name]
        state, _, reason = want.partition(":")
        assert row.state == state, f"{name}: {row.state} ({row.reason}: {row.message}), expected {want}"
        if reason:
            assert row.reason == reason, f"{name}: reason {row.reason}, expected {reason}"
        assert predictions.get(row.id, 0) == (1 if state == "predicted" else 0), f"{name}: predictions"
        stored = Path(row.stored_path)
        assert stored.is_file() and _sha(stored) == _sha(sources[name]), f"{name}: not kept byte-exact at {stored}"
        if state == "rejected":
            assert stored.is_relative_to(settings.quarantine.resolve())
            assert read_reason(stored)["reason"] == row.reason
        else:
            assert stored.is_relative_to(settings.archive.resolve())
    with session_scope(settings) as session:
        versions = set(session.scalars(select(Prediction.model_version)).all())
        probabilities = session.scalars(select(Prediction.probabilities)).all()
    assert versions == {model_version}
    for p in probabilities:
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-4)


# --- the embedded default: `covid-cxr serve` ------------------------------------------------------


class Serve:
    """``covid-cxr serve`` as a user runs it, in its own session, logging to a file."""

    def __init__(self, settings, log_path: Path) -> None:
        self.settings, self.log_path = settings, log_path
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "COVID_CXR_WEB_PORT": "0",
               **{f"COVID_CXR_{key.upper()}": str(value) for key, value in FAST.items() if key != "settle_seconds"}}
        argv = [sys.executable, "-m", "covid_cxr", "serve", "--data-dir", str(settings.data_dir),
                "--inbox", str(settings.inbox), "--settle-seconds", str(FAST["settle_seconds"])]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                            start_new_session=True)
        match = wait_until(lambda: self._alive_and(re.search(r"worker process (\d+) started", self.log())),
                           timeout=120, what="serve to start its worker")
        self.worker_pid = int(match.group(1))
        self.url = wait_until(lambda: self._alive_and(listening_url(self.log(), "dashboard")), timeout=30,
                              what="serve's dashboard")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _alive_and(self, value):  # type: ignore[no-untyped-def]
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
        return value

    def interrupt(self, timeout: float = 90.0) -> int:
        """Ctrl-C, as in a terminal; returns the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)

    def kill(self) -> None:
        for pid in (self.process.pid, self.worker_pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self.process.wait(30)


def assert_serve_metrics(url: str, rows: dict, model_version: str) -> None:
    """serve's /metrics counts what its ingester read and what its worker's pool process predicted."""
    samples = scrape(url)
    predicted = sum(1 for row in rows.values() if row.state == "predicted")
    assert samples[("covid_cxr_predictions_total", (("model_version", model_version),))] == predicted
    assert samples[("covid_cxr_batch_size_images_sum", ())] == predicted
    assert samples[("covid_cxr_inference_seconds_count", (("model_version", model_version),))] >= 1
    ingested = {labels: value for (name, labels), value in samples.items() if name == "covid_cxr_ingested_files_total"}
    assert sum(ingested.values()) == len(rows)
    assert ingested[(("reason", "wrong_modality"), ("state", "rejected"))] >= 1
    decoded = {dict(labels)["transfer_syntax"] for (name, labels) in samples
               if name == "covid_cxr_decode_seconds_count"}
    assert "1.2.840.10008.1.2.4.50" in decoded  # JPEG baseline, the SIIM file
    assert samples[("covid_cxr_files", (("reason", "none"), ("state", "predicted")))] == predicted
    status, _, body = fetch(url + "readyz")
    assert status == 200, body


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie left for its (dead) parent counts as gone
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def test_embedded_serve_end_to_end_restart_duplicate_and_conflict(tmp_path, dicom_dir, active_model):
    settings = embedded_settings(tmp_path / "data", inbox_dir=tmp_path / "inbox", **FAST)
    model = active_model.register(settings)
    files = sorted(p for p in dicom_dir.glob("*.dcm"))
    # A site exporting into a sub-folder, and two files sent the careful way (temporary name, then rename).
    drops = [(p, f"site-a/{p.name}" if i % 3 == 0 else p.name) for i, p in enumerate(files)]
    sources = {rel: src for src, rel in drops}
    expected = {rel: f"rejected:{EXPECTED_REJECTS[src.name]}" if src.name in EXPECTED_REJECTS else "predicted"
                for src, rel in drops}

    serve = Serve(settings, tmp_path / "serve-1.log")
    try:
        writer = SlowWriter(settings.inbox, drops[:-2])
        writer.start()
        for source, rel in drops[-2:]:
            shutil.copyfile(source, settings.inbox / (rel + ".part"))
            os.rename(settings.inbox / (rel + ".part"), settings.inbox / rel)
        writer.finish()
        rows = wait_all_terminal(settings, set(expected))
        assert len(rows) == len(files)
        assert_outcomes(settings, rows, expected, sources, model.version)
        assert sorted(p.name for p in settings.inbox.rglob("*") if p.is_file()) == []
        assert "progress |" in serve.log()
        assert_serve_metrics(serve.url, rows, model.version)
        assert serve.interrupt() == 0
        assert not _pid_alive(serve.worker_pid), "serve left its worker running"
    finally:
        serve.kill()

    # While the service is down: the same file again, an edited file under the same SOPInstanceUID,
    # and a new instance. After the restart each is processed once.
    (settings.inbox / "resent").mkdir()
    shutil.copyfile(dicom_dir / SIIM, settings.inbox / "resent" / "siim.dcm")
    changed_pixel_copy(dicom_dir / UNCOMPRESSED_CHEST, settings.inbox / "resent" / "edited-chest.dcm")
    write_fresh_copies([dicom_dir / SIIM], 1, settings.inbox, lambda _: "new-study/siim-new-uids.dcm")
    later = {"resent/siim.dcm": "duplicate", "resent/edited-chest.dcm": f"rejected:{Reason.SOP_INSTANCE_CONFLICT}",
             "new-study/siim-new-uids.dcm": "predicted"}
    later_sources = {name: settings.inbox / name for name in later}
    later_hashes = {name: _sha(path) for name, path in later_sources.items()}

    serve = Serve(settings, tmp_path / "serve-2.log")
    try:
        rows = wait_all_terminal(settings, set(expected) | set(later))
        assert len(rows) == len(files) + len(later)
        assert serve.interrupt() == 0
    finally:
        serve.kill()
    predictions = predictions_per_instance(settings)
    for name, want in later.items():
        row = rows[name]
        state, _, reason = want.partition(":")
        assert row.state == state and (not reason or row.reason == reason), (name, row.state, row.reason)
        assert predictions.get(row.id, 0) == (1 if state == "predicted" else 0)
        assert _sha(Path(row.stored_path)) == later_hashes[name]
    original = rows[next(rel for src, rel in drops if src.name == UNCOMPRESSED_CHEST)]
    conflict = rows["resent/edited-chest.dcm"]
    assert conflict.conflict and conflict.duplicate_of_id == original.id
    assert Path(original.stored_path).is_file() and Path(conflict.stored_path).is_file()  # both versions kept
    assert rows["resent/siim.dcm"].duplicate_of_id == rows[next(r for s, r in drops if s.name == SIIM)].id
    assert sum(predictions.values()) == sum(1 for w in [*expected.values(), *later.values()] if w == "predicted")
    assert_docs_sql_runs(settings)


# --- Redis + PostgreSQL: the ingester and a real `celery worker` ----------------------------------


CHEST_A = [SIIM, UNCOMPRESSED_CHEST, "orthanc-tests__Monochrome1-Jpeg.dcm"]
CHEST_B = ["pydicom-data__RG1_J2KI.dcm", "pylibjpeg-data__RG1_JLSN.dcm"]
REJECTS_A = ["dcmfx-pydicom__MR_small_RLE.dcm", "pylibjpeg-data__RG2_JPLY_fixed.dcm"]


def test_redis_postgres_with_a_real_celery_worker(tmp_path, dicom_dir, active_model, postgres_url, redis_url):
    settings = distributed_settings(tmp_path / "data", postgres_url, redis_url, inbox_dir=tmp_path / "inbox",
                                    requeue_after_seconds=120, **FAST)
    model = active_model.register(settings)
    drops = [(dicom_dir / name, f"pacs/{name}") for name in CHEST_A + REJECTS_A]
    expected = {rel: f"rejected:{EXPECTED_REJECTS[src.name]}" if src.name in EXPECTED_REJECTS else "predicted"
                for src, rel in drops}
    with start_worker(settings, [settings.inference_queue], log_path=tmp_path / "worker.log",
                      env={"COVID_CXR_PROBE_PORT": "0"}) as worker, RunningIngester(settings):
        writer = SlowWriter(settings.inbox, drops)
        writer.start()
        writer.finish()
        rows = wait_all_terminal(settings, set(expected))
        # The worker's own endpoint adds up what its prefork pool process counted.
        probes = listening_url(worker.log_text(), "probes")
        assert probes is not None, worker.log_text()[-3000:]
        predicted = sum(1 for row in rows.values() if row.state == "predicted")
        samples = scrape(probes)
        assert samples[("covid_cxr_predictions_total", (("model_version", model.version),))] == predicted
        assert samples[("covid_cxr_queue_depth_messages", (("queue", settings.inference_queue),))] == 0
        status, _, body = fetch(probes + "readyz")
        assert status == 200 and b'"model":"ok"' in body, body
    assert_outcomes(settings, rows, expected, {rel: src for src, rel in drops}, model.version)
    assert_docs_sql_runs(settings)


class PrivateRedis:
    """A redis-server of this test's own on a free port, so the test can take the broker down and up again."""

    def __init__(self, tmp_path: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if IN_CI:
                pytest.fail("redis-server is required in CI (CI=true) but is not installed")
            pytest.skip("redis-server not installed: the broker-outage test was NOT run")
        self.binary, self.dir = binary, tmp_path
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self._accepting, timeout=20, interval=0.1, what="the private redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        self.process = None

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_broker_outage_while_files_arrive_loses_nothing(tmp_path, dicom_dir, active_model, postgres_url,
                                                        private_redis):
    settings = distributed_settings(tmp_path / "data", postgres_url, private_redis.url, inbox_dir=tmp_path / "inbox",
                                    requeue_after_seconds=120, **FAST)
    model = active_model.register(settings)
    first = [(dicom_dir / SIIM, "before/siim.dcm")]
    during = [(dicom_dir / name, f"during/{name}") for name in CHEST_B]
    during.append((dicom_dir / "pylibjpeg-data__RG2_JPLL.dcm", "during/hip.dcm"))
    expected = {"before/siim.dcm": "predicted", "during/hip.dcm": "rejected:wrong_body_part",
                **{f"during/{name}": "predicted" for name in CHEST_B}}
    with start_worker(settings, [settings.inference_queue], log_path=tmp_path / "worker.log"), \
            RunningIngester(settings) as ingester:
        SlowWriter(settings.inbox, first).run()
        wait_all_terminal(settings, {"before/siim.dcm"})

        private_redis.stop()
        writer = SlowWriter(settings.inbox, during)
        writer.start()
        writer.finish()
        # Recorded while the broker is down: nothing lost, the accepted ones wait as 'received'.
        rows = wait_until(lambda: (r := rows_by_name(settings)) and len(r) == 4 and r, timeout=60,
                          what="the files dropped during the outage to be recorded")
        assert {rows[f"during/{name}"].state for name in CHEST_B} == {"received"}
        assert ingester.batcher.refused_batches >= 1

        private_redis.start()  # empty: whatever was queued before is gone too
        rows = wait_all_terminal(settings, set(expected))
    sources = {rel: src for src, rel in first + during}
    assert_outcomes(settings, rows, expected, sources, model.version)
    assert max(predictions_per_instance(settings).values()) == 1


def _hostile_inbox(inbox: Path, outside: Path, dicom_dir: Path) -> tuple[dict[str, str], int]:
    """30 entries a hostile or broken sender could leave: {inbox name: expected rejection(s), "|"-separated},
    and how many of them end on the stuck list instead."""
    chest = (dicom_dir / UNCOMPRESSED_CHEST).read_bytes()
    rejected: dict[str, str] = {}
    for i in range(3):
        (inbox / f"link-{i}.dcm").symlink_to(outside / f"target-{i}.dcm")
        if i < 2:
            os.mkfifo(inbox / f"pipe-{i}.dcm")
        long_name = f"{i}" + "x" * 254
        (inbox / long_name).write_bytes(os.urandom(2048))
        rejected[long_name] = Reason.NOT_DICOM
        odd = os.fsencode(inbox) + b"/bad-\xff\xfe-" + str(i).encode() + b".dcm"
        Path(os.fsdecode(odd)).write_bytes(chest[: len(chest) // 2 + 997 * i])  # three different cuts
        rejected[f"bad-\\xff\\xfe-{i}.dcm"] = Reason.TRUNCATED
        forged = f"x{i}.dcm\n2026-11-29 12:00:00,000 ERROR ingest.service: forged line {i}"
        (inbox / forged).write_bytes(b"")
        rejected[forged] = Reason.NOT_DICOM
        ds = pydicom.dcmread(dicom_dir / UNCOMPRESSED_CHEST)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = "\x1b[2J\x1b]0;owned\x07"
        ds.StudyDescription = "<script>alert(1)</script>"
        ds.save_as(inbox / f"ansi-{i}.dcm")
        rejected[f"ansi-{i}.dcm"] = Reason.WRONG_MODALITY
        (inbox / f"empty-{i}.dcm").write_bytes(b"")
        rejected[f"empty-{i}.dcm"] = Reason.NOT_DICOM
        (inbox / f"noise-{i}.dcm").write_bytes(os.urandom(4096))
        rejected[f"noise-{i}.dcm"] = Reason.NOT_DICOM
        (inbox / f"preamble-{i}.dcm").write_bytes(bytes(128) + b"DICM" + os.urandom(512))
        rejected[f"preamble-{i}.dcm"] = f"{Reason.NOT_DICOM}|{Reason.TRUNCATED}"  # random elements run past the end
    for i in range(2):  # HTML in a header of a file that is no chest
        ds = pydicom.dcmread(dicom_dir / "pylibjpeg-data__RG2_JPLY_fixed.dcm")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDescription = '<img src=x onerror="alert(1)">'
        ds.save_as(inbox / f"html-{i}.dcm")
        rejected[f"html-{i}.dcm"] = Reason.WRONG_BODY_PART
    (inbox / "folder-link").symlink_to(outside, target_is_directory=True)
    fd = os.open(inbox, os.O_RDONLY)
    try:  # a path past PATH_MAX
        for _ in range(17):
            os.mkdir("d" * 250, dir_fd=fd)
            child = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("deep.dcm", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as handle:
            handle.write(chest)
    finally:
        os.close(fd)
    stuck = 3 + 2 + 1 + 1  # links, pipes, the folder link, the deep path
    assert len(rejected) + stuck == 30
    return rejected, stuck


def test_hostile_entries_beside_good_files_all_end_visible_and_nothing_outside_is_touched(tmp_path, dicom_dir,
                                                                                           active_model):
    from ingest.stuck import stuck_files

    settings = embedded_settings(tmp_path / "data", inbox_dir=tmp_path / "inbox", **FAST)
    active_model.register(settings)
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(3):
        shutil.copyfile(dicom_dir / UNCOMPRESSED_CHEST, outside / f"target-{i}.dcm")
    outside_before = {p.name: (_sha(p), p.stat().st_mtime_ns) for p in outside.iterdir()}
    settings.inbox.mkdir(parents=True)
    good = {f"good/{i:02d}.dcm" for i in range(30)}
    (settings.inbox / "good").mkdir()
    for name in good:
        (settings.inbox / name).write_bytes(with_fresh_uids(dicom_dir / UNCOMPRESSED_CHEST))
    rejected, stuck_count = _hostile_inbox(settings.inbox, outside, dicom_dir)

    serve = Serve(settings, tmp_path / "serve.log")
    try:
        rows = wait_all_terminal(settings, good | set(rejected), timeout=240)
        wait_until(lambda: len(stuck_files(settings)) == stuck_count, timeout=30, what="the stuck list")
        assert serve.interrupt() == 0
    finally:
        serve.kill()
    predictions = predictions_per_instance(settings)
    for name in good:
        assert rows[name].state == "predicted" and predictions[rows[name].id] == 1, name
    for name, reasons in rejected.items():
        assert rows[name].state == "rejected" and rows[name].reason in reasons.split("|"), (name, rows[name].reason)
        raw = reason_path(Path(rows[name].stored_path)).read_bytes()
        assert not set(raw) & (set(range(32)) - {10}), f"raw control bytes in the reason file of {name!r}"
    assert len(rows) == len(good) + len(rejected)
    causes = sorted(entry["cause"] for entry in stuck_files(settings))
    assert causes == ["name_too_long"] + ["not_a_regular_file"] * 6
    assert {p.name: (_sha(p), p.stat().st_mtime_ns) for p in outside.iterdir()} == outside_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "inbox", "outside", "serve.log"]
    log = serve.log()
    assert "Traceback" not in log
    assert not re.findall(r"^\S+ \S+ (?:ERROR|CRITICAL) ", log, flags=re.MULTILINE)
    assert "\x1b" not in log and "\x07" not in log
    assert not any(line.startswith("2026-11-29 12:00:00,000 ERROR") for line in log.splitlines()), "a forged line"
    assert log.count("stuck (") == stuck_count, "each problem is logged once"
