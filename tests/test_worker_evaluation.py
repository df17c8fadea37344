"""The evaluation job on hand-made predictions and labels: hand-computed and undefined metrics, storage, pages, CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, text, update

from covid_cxr.errors import DatasetError
from covid_cxr.settings import load_settings
from db.migrate import upgrade
from db.models import (
    EvaluationReport,
    GroundTruthLabel,
    Instance,
    ModelVersion,
    NormalizedImage,
    Prediction,
    Study,
    StudyResult,
)
from db.session import create_engine_for, session_scope
from model_store.drift import training_reference
from service.cli import main
from worker.evaluation import run_evaluation
from worker.evaluation_store import latest_reports
from worker.evaluation_window import resolve_window

NOW = datetime(2026, 11, 25, 2, 0, tzinfo=UTC)
RECENT = NOW - timedelta(hours=3)
OLD = NOW - timedelta(days=3)

# (true label or None / "conflict", P(covid)) per image of model v1, one study per image.
V1_CASES = [
    ("covid", 0.9), ("covid", 0.8), ("covid", 0.3),  # TP, TP, FN
    ("normal", 0.6), ("normal", 0.2), ("normal", 0.1), ("normal", 0.4),  # FP, TN, TN, TN
    (None, 0.7), ("conflict", 0.5),  # not in the metrics
]
# Model v2 only ever saw normals and called them normal: no positive case, no positive call.
V2_CASES = [("normal", 0.2), ("normal", 0.3), ("normal", 0.1)]


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out as in Wilson (1927)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def seed(settings, now: datetime = NOW) -> None:
    """Predictions of v1 and v2 in the last 24 h, one older v1 prediction, rejects, labels and two model records."""
    recent, old = now - (NOW - RECENT), now - (NOW - OLD)
    rng = np.random.default_rng(0)
    with session_scope(settings) as session:
        session.add(ModelVersion(name="covid-cxr", version="v1", sha256="a" * 64, active=True, metadata_json={
            "decision_threshold": 0.5, "preprocessing_version": "p1", "class_names": ["covid", "normal"],
            "reference": training_reference(rng.uniform(0, 1, 400), rng.normal(120, 10, 400), rng.normal(60, 5, 400)),
        }))
        session.add(ModelVersion(name="covid-cxr", version="v2", sha256="b" * 64, metadata_json={}))
        serial = 0

        def image(version: str, truth: str | None, prob: float, when: datetime) -> None:
            nonlocal serial
            serial += 1
            study = Study(study_instance_uid=f"1.2.{serial}", accession_number=f"ACC{serial}", created_at=when)
            session.add(study)
            session.flush()
            instance = Instance(state="predicted", file_name=f"{serial}.dcm", file_sha256=f"{serial:064d}",
                                study_id=study.id, study_instance_uid=study.study_instance_uid,
                                sop_instance_uid=f"1.2.{serial}.1", created_at=when)
            session.add(instance)
            session.flush()
            session.add(NormalizedImage(instance_id=instance.id, preprocessing_version="p1", png=b"",
                                        mean=120.0 + serial, std=60.0))
            label = "covid" if prob >= 0.5 else "normal"
            session.add(Prediction(instance_id=instance.id, model_version=version, preprocessing_version="p1",
                                   probabilities={"covid": prob, "normal": 1 - prob}, prob_covid=prob, label=label,
                                   threshold=0.5, created_at=when))
            session.add(StudyResult(study_id=study.id, model_version=version, n_images=1, prob_covid=prob, label=label,
                                    rule="max_frontal", updated_at=when))
            if truth == "conflict":
                for source, value in (("rt-pcr", "covid"), ("radiologist", "normal")):
                    session.add(GroundTruthLabel(key_type="study_instance_uid", key_value=study.study_instance_uid,
                                                 label=value, source=source, label_date="2026-11-24"))
            elif truth is not None:
                session.add(GroundTruthLabel(key_type="study_instance_uid", key_value=study.study_instance_uid,
                                             label=truth, source="rt-pcr", label_date="2026-11-24"))

        for truth, prob in V1_CASES:
            image("v1", truth, prob, recent)
        for truth, prob in V2_CASES:
            image("v2", truth, prob, recent)
        image("v1", "covid", 0.05, old)  # a FN outside the 24 h window
        for serial_no, (state, reason, when) in enumerate([
            ("rejected", "not_dicom", recent), ("rejected", "not_dicom", recent),
            ("rejected", "modality_not_allowed", recent), ("failed", "corrupt_image", recent),
            ("rejected", "not_dicom", old),
        ]):
            session.add(Instance(state=state, reason=reason, file_name=f"r{serial_no}", file_sha256=f"r{serial_no}",
                                 created_at=when))


@pytest.fixture(autouse=True, scope="module")
def fewer_bootstrap_resamples():
    """100 resamples instead of 1000: the intervals are checked for presence here, not for precision."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("worker.evaluation_metrics.BOOTSTRAP_RESAMPLES", 100)
        yield


@pytest.fixture
def settings(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    upgrade(settings)
    seed(settings)
    return settings


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One database evaluated once over 24 h and over all time, shared by the tests that only read it."""
    settings = load_settings(data_dir=tmp_path_factory.mktemp("evaluated"))
    upgrade(settings)
    seed(settings)
    run_evaluation(settings, "24h", now=NOW)
    run_evaluation(settings, "all", now=NOW)
    return settings


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request, tmp_path, monkeypatch):
    url = None
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("PGTZ", "America/New_York")  # windows are UTC instants whatever the session's zone
    settings = load_settings(data_dir=tmp_path, database_url=url)
    upgrade(settings)
    seed(settings)
    return settings


def stored(settings, version: str, level: str = "image", window: str = "24h") -> EvaluationReport:
    with session_scope(settings) as session:
        return session.scalars(select(EvaluationReport).where(
            EvaluationReport.model_version == version, EvaluationReport.level == level,
            EvaluationReport.window == window)).one()


def test_metrics_equal_hand_computed_values(evaluated):
    report = stored(evaluated, "v1")
    performance = report.metrics["performance"]
    assert report.n == 7
    assert performance["confusion_matrix"] == [[2, 1], [1, 3]]  # rows true covid/normal, columns predicted
    expected = {"accuracy": (5, 7), "sensitivity": (2, 3), "specificity": (3, 4), "ppv": (2, 3), "npv": (3, 4)}
    for name, (k, n) in expected.items():
        assert (performance[name]["k"], performance[name]["n"]) == (k, n), name
        assert performance[name]["value"] == pytest.approx(k / n)
        assert performance[name]["ci"] == pytest.approx(wilson(k, n), abs=1e-9)
    assert performance["f1"]["value"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # AUC: of the 3 x 4 (covid, normal) pairs, the covid image scores higher in 10.
    assert performance["roc_auc"]["value"] == pytest.approx(10 / 12)
    assert performance["roc_auc"]["ci"] is not None
    squared_errors = [(1 - 0.9) ** 2, (1 - 0.8) ** 2, (1 - 0.3) ** 2, 0.6 ** 2, 0.2 ** 2, 0.1 ** 2, 0.4 ** 2]
    assert performance["brier"] == pytest.approx(sum(squared_errors) / 7)
    assert "covid" in performance["classification_report"] and "support" in performance["classification_report"]
    assert report.metrics["population"] == {
        "predictions": 9, "labelled": 7, "unlabelled": 1, "conflicting_labels": 1,
        "predicted": {"covid": 5, "normal": 4}, "decision_mismatches": 0,
    }
    assert report.flags == ["label_conflicts"]
    assert "acc: 0.7143 (5/7" in report.text_report
    subgroups = report.metrics["subgroups"]
    assert set(subgroups) == {"manufacturer", "modality", "view_position", "institution_name", "patient_sex",
                              "age_band"}
    assert sum(row["n"] for row in subgroups["view_position"]) == 7  # the labelled images, each in one group
    assert "subgroups by view_position" in report.text_report
    assert "calibration: scores NOT calibrated" in report.text_report and report.metrics["calibration"]["ece"] >= 0


def test_a_class_with_no_positives_gives_undefined_metrics_not_zero(evaluated):
    performance = stored(evaluated, "v2").metrics["performance"]
    assert performance["counts"] == {"covid": 0, "normal": 3}
    for name in ("sensitivity", "ppv"):
        assert performance[name] == {"k": 0, "n": 0, "value": None, "ci": None}, name
    assert performance["f1"]["value"] is None
    assert performance["roc_auc"]["value"] is None
    assert performance["specificity"]["value"] == 1.0 and performance["npv"]["value"] == 1.0
    assert "sensitivity: undefined (0/0)" in stored(evaluated, "v2").text_report


def test_window_bounds_predictions_and_reject_counts(evaluated):
    day, everything = stored(evaluated, "v1"), stored(evaluated, "v1", window="all")
    assert (day.n, everything.n) == (7, 8)  # the old false negative counts only in 'all'
    assert everything.metrics["performance"]["fn"] == 2
    assert day.metrics["rejects"] == {
        "files": 16, "by_state": {"predicted": 12, "rejected": 3, "failed": 1},
        "by_reason": {"rejected": {"not_dicom": 2, "modality_not_allowed": 1}, "failed": {"corrupt_image": 1}},
    }
    assert everything.metrics["rejects"]["by_reason"]["rejected"]["not_dicom"] == 3
    assert "rejected by reason: not_dicom 2, modality_not_allowed 1" in day.text_report


def test_study_level_report_uses_study_results(evaluated):
    study = stored(evaluated, "v1", level="study")
    assert study.n == 7 and study.metrics["performance"]["confusion_matrix"] == [[2, 1], [1, 3]]
    assert study.metrics["drift"]["status"] == "not_applicable"


def test_drift_against_the_reference_or_unavailable(evaluated):
    drift = stored(evaluated, "v1").metrics["drift"]
    assert drift["status"] == "too_few"  # 9 images: PSI reported, no verdict
    assert drift["image_mean"]["n"] == 9 and drift["image_mean"]["psi"] > 0
    assert drift["prob_covid"]["reference_n"] == 400
    unavailable = stored(evaluated, "v2").metrics["drift"]
    assert unavailable["status"] == "unavailable" and "no training reference" in unavailable["reason"]


def test_running_twice_replaces_the_report(db_settings):
    first = run_evaluation(db_settings, "24h", now=NOW)
    with session_scope(db_settings) as session:  # a label arrives for the unlabelled image
        study_uid = session.scalar(text(
            "SELECT study_instance_uid FROM v_image_results WHERE model_version = 'v1' AND label_status IS NULL"
            " AND prob_covid = 0.7"))
        session.add(GroundTruthLabel(key_type="study_instance_uid", key_value=study_uid, label="covid",
                                     source="rt-pcr", label_date="2026-11-25"))
    second = run_evaluation(db_settings, "24h", now=NOW + timedelta(hours=1))
    assert len(first) == len(second) == 4
    with session_scope(db_settings) as session:
        assert session.scalar(select(func.count()).select_from(EvaluationReport)) == 4
    assert stored(db_settings, "v1").n == 8
    # The analysts' view shows the same numbers as the report.
    with create_engine_for(db_settings).connect() as connection:
        row = connection.execute(text(
            "SELECT n, n_covid, accuracy, sensitivity_low, roc_auc FROM v_model_performance"
            " WHERE model_version = 'v1' AND level = 'image'")).one()
    performance = stored(db_settings, "v1").metrics["performance"]
    assert tuple(row) == (8, 4, pytest.approx(performance["accuracy"]["value"]),
                          pytest.approx(performance["sensitivity"]["ci"][0]),
                          pytest.approx(performance["roc_auc"]["value"]))


def test_plots_and_a_self_contained_html_page_are_written(evaluated):
    report = stored(evaluated, "v1")
    assert set(report.plot_paths) == {"confusion_matrix", "roc_curve", "score_histogram", "reliability"}
    for path in report.plot_paths.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(report.html_path).read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page and str(evaluated.reports) not in page
    assert "label_conflicts" in page and "5/7" in page


def test_markup_in_a_model_name_or_a_reason_never_reaches_the_page_unescaped(settings):
    hostile = '<script>alert("x")</script>'
    with session_scope(settings) as session:
        session.execute(update(ModelVersion).where(ModelVersion.version == "v2").values(name=hostile))
        session.execute(update(Instance).where(Instance.reason == "corrupt_image").values(reason=hostile))
    run_evaluation(settings, "24h", model_version="v2", now=NOW)
    report = stored(settings, "v2")
    assert hostile in report.text_report  # the stored text is plain text
    page = Path(report.html_path).read_text(encoding="utf-8")
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") == 4  # title, heading, model line, reason


def test_without_labels_only_the_score_histogram_is_drawn(settings):
    with session_scope(settings) as session:
        session.execute(text("DELETE FROM labels"))
    run_evaluation(settings, "24h", model_version="v1", now=NOW)
    unlabelled = stored(settings, "v1")
    assert set(unlabelled.plot_paths) == {"score_histogram"}
    assert unlabelled.flags == ["no_labelled_predictions"]
    assert unlabelled.metrics["performance"]["accuracy"]["value"] is None


def test_one_model_version_or_a_clear_error(settings):
    assert {s.model_version for s in run_evaluation(settings, "24h", model_version="v2", now=NOW)} == {"v2"}
    with pytest.raises(DatasetError, match="no predictions") as caught:
        run_evaluation(settings, "24h", model_version="v9", now=NOW)
    assert caught.value.reason == "no_predictions"
    with pytest.raises(DatasetError, match="unknown window"):
        resolve_window("1h")


def test_latest_report_per_model_version_and_level(evaluated):
    latest = latest_reports(evaluated)
    assert sorted((r.model_version, r.level, r.window) for r in latest) == [
        ("v1", "image", "all"), ("v1", "study", "all"), ("v2", "image", "all"), ("v2", "study", "all")]


def test_task_is_registered_on_the_app_and_runs(settings):
    from taskqueue.names import EVALUATE_TASK
    from worker.app import create_worker_app as create_app

    app = create_app(settings)
    app.loader.import_default_modules()
    result = app.tasks[EVALUATE_TASK].apply(kwargs={"window": "all"}).get()
    assert {(r["model_version"], r["level"]) for r in result["reports"]} == {
        ("v1", "image"), ("v1", "study"), ("v2", "image"), ("v2", "study")}
    json.dumps(result)  # the task result is JSON, like every message


def test_the_job_does_not_import_tensorflow():
    code = "import sys, worker.evaluation; assert not {'tensorflow', 'keras'} & set(sys.modules), 'imported TF'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- command line ------------------------------------------------------------------------------------


def test_cli_labels_import_reports_lines_and_exit_code(settings, tmp_path, capsys):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("StudyInstanceUID,label,source,date\n1.2.1,covid,rt-pcr,2026-11-24\n1.2.999,covid,rt-pcr,2026-11-24\n")
    assert main(["labels", "import", str(csv_file), "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "1 unchanged" in out and "line 3: error: unknown StudyInstanceUID 1.2.999" in out
    csv_file.write_text("StudyInstanceUID,label,source,date\n1.2.1,covid,rt-pcr,2026-11-24\n")
    assert main(["labels", "import", str(csv_file), "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged"] == 1


def test_cli_wrong_header_is_an_error(settings, tmp_path, capsys):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("uid,diagnosis\n1.2.1,covid\n")
    assert main(["labels", "import", str(csv_file), "--data-dir", str(tmp_path)]) == 1
    assert "line 1: wrong header" in capsys.readouterr().err


def test_cli_evaluate_then_report(settings, tmp_path, capsys):
    assert main(["evaluate", "--window", "all", "--model", "v1", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "v1" in out and "image" in out and "report.html" in out
    assert main(["report", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "covid-cxr evaluation: model covid-cxr v1, image level" in out and "flags:" in out
    assert main(["report", "--json", "--data-dir", str(tmp_path)]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert {(r["model_version"], r["level"]) for r in reports} == {("v1", "image"), ("v1", "study")}
    assert reports[0]["metrics"]["performance"]["n"] == 8
    assert main(["evaluate", "--window", "all", "--model", "nope", "--data-dir", str(tmp_path)]) == 1
    assert "no predictions" in capsys.readouterr().err


def test_cli_report_without_reports_says_so(tmp_path, capsys):
    upgrade(load_settings(data_dir=tmp_path))
    assert main(["report", "--data-dir", str(tmp_path)]) == 0
    assert "no evaluation report yet" in capsys.readouterr().out


# --- with real files, the real service and real workers ---------------------------------------------------

#: Short timings so the service test waits seconds, not the production defaults.
FAST = {"settle_seconds": 0.5, "reconcile_interval_seconds": 2.0, "batch_max_wait_seconds": 0.5, "batch_size": 4}


def clean_images(cxr_dir, label: str, count: int) -> list:
    """The first ``count`` images of a class whose bytes are verified originals or plain conversions."""
    with open(cxr_dir / "metadata.csv", newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle)
                if row["label"] == label and not row["integrity"].startswith(("unverified", "visibly"))]
    return [cxr_dir / row["file"] for row in sorted(rows, key=lambda row: row["file"])[:count]]


@pytest.mark.slow
def test_end_to_end_labelled_dicoms_through_the_service_to_the_report(tmp_path, cxr_dir, active_model, capsys):
    from dicom_wrap import wrap_as_dicom
    from service_fixtures import WORKER_READY, RunningIngester, embedded_settings, start_worker, wait_until

    settings = embedded_settings(tmp_path / "data", inbox_dir=tmp_path / "inbox", **FAST)
    model = active_model.register(settings)
    staging = tmp_path / "staging"
    covid, normal = clean_images(cxr_dir, "covid", 3), clean_images(cxr_dir, "normal", 3)
    # Two covid images in one study (labelled by StudyInstanceUID), one by its SOPInstanceUID,
    # the normals by AccessionNumber; plus a Secondary Capture and a text file, which are rejected.
    first = wrap_as_dicom(covid[0], staging / "c0.dcm", patient_id="P1")
    wrapped = [first, wrap_as_dicom(covid[1], staging / "c1.dcm", study_instance_uid=first.study_instance_uid,
                                    accession_number=first.accession_number, patient_id="P1", view_position="AP")]
    wrapped += [wrap_as_dicom(covid[2], staging / "c2.dcm", patient_id="P2")]
    wrapped += [wrap_as_dicom(path, staging / f"n{i}.dcm", patient_id=f"P{3 + i}") for i, path in enumerate(normal)]
    truth = {w.sop_instance_uid: label for w, label in zip(wrapped, ["covid"] * 3 + ["normal"] * 3, strict=False)}
    wrap_as_dicom(normal[0], staging / "scanned-film.dcm", kind="SC")
    (staging / "notes.txt").write_text("not an image")
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(
        "StudyInstanceUID,SOPInstanceUID,AccessionNumber,label,source,date\n"
        f"{first.study_instance_uid},,,covid,rt-pcr,2026-03-16\n"
        f",{wrapped[2].sop_instance_uid},,covid,radiologist,2026-03-16\n"
        + "".join(f",,{w.accession_number},normal,rt-pcr,2026-03-16\n" for w in wrapped[3:])
    )

    with start_worker(settings, [settings.inference_queue], wait_for=(WORKER_READY,),
                      log_path=tmp_path / "worker.log"), RunningIngester(settings):
        settings.inbox.mkdir(parents=True, exist_ok=True)
        for path in sorted(staging.iterdir()):
            shutil.copyfile(path, settings.inbox / path.name)

        def all_final() -> bool:
            with session_scope(settings) as session:
                states = session.scalars(select(Instance.state)).all()
            return len(states) == 8 and all(state in {"predicted", "rejected"} for state in states)

        wait_until(all_final, timeout=300, interval=0.5, what="8 files ingested and predicted or rejected")

    assert main(["labels", "import", str(labels_csv), "--data-dir", str(settings.data_dir)]) == 0
    assert "5 added" in capsys.readouterr().out
    assert main(["evaluate", "--window", "24h", "--data-dir", str(settings.data_dir)]) == 0
    capsys.readouterr()

    with session_scope(settings) as session:
        served = dict(session.execute(select(Instance.sop_instance_uid, Prediction.label)
                                      .join(Prediction, Prediction.instance_id == Instance.id)).all())
    assert set(served) == set(truth)
    expected_matrix = [[sum(1 for uid in truth if truth[uid] == t and served[uid] == p) for p in ("covid", "normal")]
                       for t in ("covid", "normal")]
    image = stored(settings, model.version)
    performance = image.metrics["performance"]
    assert image.n == 6 and performance["counts"] == {"covid": 3, "normal": 3}
    assert performance["confusion_matrix"] == expected_matrix
    assert performance["accuracy"]["k"] == expected_matrix[0][0] + expected_matrix[1][1]
    assert image.metrics["population"]["predictions"] == 6
    assert image.metrics["rejects"]["by_reason"] == {"rejected": {"wrong_modality": 1, "not_dicom": 1}}
    assert image.metrics["drift"]["status"] == "unavailable"  # the test model has no training reference
    study = stored(settings, model.version, level="study")
    assert study.n == 5 and study.metrics["performance"]["counts"] == {"covid": 2, "normal": 3}
    assert Path(image.html_path).is_file()


@pytest.mark.slow
def test_beat_fires_the_evaluation_on_redis_and_postgres(tmp_path, postgres_url, redis_url):
    from service_fixtures import distributed_settings, start_worker, wait_until

    # celery beat's finest crontab is one minute: the job fires at the next minute boundary.
    settings = distributed_settings(tmp_path / "data", postgres_url, redis_url, evaluation_cron="* * * * *")
    upgrade(settings)
    seed(settings, now=datetime.now(UTC))

    def reports() -> list[tuple[str, str, str]]:
        with session_scope(settings) as session:
            return session.execute(select(EvaluationReport.window, EvaluationReport.model_version,
                                          EvaluationReport.level)).all()

    with start_worker(settings, [settings.cpu_queue], beat=True, log_path=tmp_path / "worker.log") as worker:
        found = wait_until(lambda: len(reports()) >= 4 and reports(), timeout=150, interval=1.0,
                           what="the scheduled evaluation to store its reports")
        log_text = worker.log_text()
    assert sorted(found) == [("24h", "v1", "image"), ("24h", "v1", "study"), ("24h", "v2", "image"),
                             ("24h", "v2", "study")]
    assert "covid_cxr.evaluate" in log_text
    assert stored(settings, "v1").n == 7
