"""``covid-cxr train`` and ``covid-cxr models ...``: clear errors on bad input, and a small run end to end."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from covid_cxr.commandline import EXIT_ERROR, EXIT_USAGE
from covid_cxr.constants import CLASS_NAMES
from service.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_on_an_empty_folder_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--data-dir", str(tmp_path / "data"), "--folder", str(tmp_path))
    assert code == EXIT_ERROR
    assert "no labelled images found" in err and "[empty_dataset]" in err


def test_train_on_a_csv_with_unknown_labels_fails_clearly(cxr_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--data-dir", str(tmp_path / "data"), "--csv", str(cxr_dir / "metadata.csv"))
    assert code == EXIT_ERROR
    assert "'pneumonia' x36" in err and "[unknown_labels]" in err
    assert not (tmp_path / "data" / "runs").exists()


def test_train_with_bad_options_fails_before_reading_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--folder", str(tmp_path / "absent"), "--epochs", "0")
    assert code == EXIT_USAGE and "epochs must be >= 1" in err and "[bad_training_options]" in err


def test_where_needs_a_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--folder", str(tmp_path), "--where", "label=covid")
    assert code == EXIT_USAGE and "--where filters CSV rows" in err and "[bad_filter]" in err


def test_models_list_and_activate_on_an_empty_registry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    code, out, _ = run(capsys, "models", "list", *data)  # the embedded database is created on first use
    assert code == 0 and "no models registered" in out
    assert (tmp_path / "data" / "covid-cxr.sqlite3").is_file()
    code, out, _ = run(capsys, "models", "list", *data)
    assert code == 0 and "no models registered" in out
    code, _, err = run(capsys, "models", "activate", "covid-cxr", *data)
    assert code == EXIT_USAGE and "NAME:VERSION" in err and "[bad_model_reference]" in err
    code, _, err = run(capsys, "models", "show", *data)
    assert code == EXIT_ERROR and "[no_active_model]" in err


def test_models_commands_default_to_the_configured_model_name(cxr_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVID_CXR_MODEL_NAME", "chest-test")
    data = ["--data-dir", str(tmp_path / "data")]
    assert run(capsys, "db", "upgrade", *data)[0] == 0
    code, _, err = run(capsys, "models", "show", *data)
    assert code == EXIT_ERROR and "no active model 'chest-test'" in err
    for argv in (("show", ":v1"), ("activate", ":v1"), ("export", ":v1", str(tmp_path / "out")),
                 ("evaluate", ":v1", "--folder", str(cxr_dir))):
        code, _, err = run(capsys, "models", *argv, *data)
        assert code == EXIT_ERROR and "no model chest-test version v1 is registered" in err, argv


def small_csv(cxr_dir: Path, target: Path, per_class: int = 4) -> Path:
    with (cxr_dir / "metadata.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["label"] in CLASS_NAMES and not row["subset"]]
    chosen: list[dict[str, str]] = []
    for label in CLASS_NAMES:
        patients: dict[str, dict[str, str]] = {}
        for row in rows:
            if row["label"] == label and len(patients) < per_class:
                patients.setdefault(row["patient_id"], row)
        chosen += patients.values()
    path = target / "small.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "patient_id", "site"])
        for row in chosen:
            writer.writerow([str(cxr_dir / row["file"]), row["label"], row["patient_id"], "shared"])
        writer.writerow([str(cxr_dir / "pneumonia" / "x.jpg"), "pneumonia", "p1", "elsewhere"])
    return path


@pytest.mark.slow
def test_train_register_list_evaluate_export(cxr_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert run(capsys, "db", "upgrade", *data)[0] == 0
    csv_path = small_csv(cxr_dir, tmp_path)
    dataset = ["--csv", str(csv_path), "--where", "site=shared"]
    code, out, err = run(capsys, "train", *data, *dataset, "--epochs", "1", "--augment-copies", "1",
                         "--test-fraction", "0.25", "--validation-fraction", "0", "--out", str(tmp_path / "run"),
                         "--activate", "--no-progress")
    # One epoch on 6 images: the model predicts one class for the whole test part, so it is flagged and refused.
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert metadata["degenerate"]["degenerate"] and "for all 2 images of the test part" in out
    assert code == 1 and "[degenerate_model]" in err and "FLAG: DEGENERATE MODEL" in out
    assert "acc:" in out and "shortcut check" in out and "(active)" not in out
    code, out, err = run(capsys, "models", "import", str(tmp_path / "run"), "--activate", *data)
    assert code == 1 and "[degenerate_model]" in err
    code, out, err = run(capsys, "models", "import", str(tmp_path / "run"), "--activate", "--force", *data)
    assert code == 0, err
    assert metadata["data"]["source"]["where"] == {"site": ["shared"]}
    assert metadata["training"]["early_stopping"] is False

    code, out, _ = run(capsys, "models", "list", *data)
    assert code == 0 and "* covid-cxr" in out and metadata["version"] in out

    code, out, _ = run(capsys, "models", "show", f"covid-cxr:{metadata['version']}", *data)
    assert code == 0 and json.loads(out)["sha256"] == metadata["sha256"]

    code, out, err = run(capsys, "models", "evaluate", *data, *dataset, "--part", "test", "--out",
                         str(tmp_path / "eval"), "--no-progress")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())
    # The recorded test part, scored through the serving path, reproduces the training run's figures.
    assert evaluated["metrics"]["confusion_matrix"] == metadata["metrics"]["test"]["confusion_matrix"]
    assert evaluated["metrics"]["roc_auc"]["value"] == pytest.approx(metadata["metrics"]["test"]["roc_auc"]["value"])
    assert evaluated["baseline"]["metrics"]["accuracy"] == metadata["metrics"]["baseline_test"]["accuracy"]
    for name in ("report.txt", "confusion_matrix.png", "roc_curve.png"):
        assert (tmp_path / "eval" / name).is_file()

    code, out, _ = run(capsys, "models", "evaluate", *data, "--artifact", str(tmp_path / "run"), *dataset,
                       "--out", str(tmp_path / "eval-all"), "--no-progress")
    assert code == 0 and "belong to patients the model was trained or validated on" in out

    code, _, _ = run(capsys, "models", "export", "covid-cxr", str(tmp_path / "exported"), *data)
    assert code == 0
    assert json.loads((tmp_path / "exported" / "metadata.json").read_text())["sha256"] == metadata["sha256"]


def test_a_server_database_is_never_migrated_by_the_models_commands(postgres_url: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "models", "list", "--data-dir", str(tmp_path), "--database-url", postgres_url)
    assert code == EXIT_ERROR and "covid-cxr db upgrade" in err and "[schema_out_of_date]" in err


def test_models_import_activate_works_on_a_fresh_embedded_data_dir(model_artifact, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "fresh")]
    code, out, err = run(capsys, "models", "import", str(model_artifact.directory), "--activate", *data)
    assert code == 0, err
    code, out, _ = run(capsys, "models", "show", *data)
    assert code == 0 and model_artifact.version in out


@pytest.mark.parametrize("version", ["../../../../escaped", "a/b", "..", "v1;rm -rf", ""])
def test_an_artifact_whose_version_would_leave_the_model_folders_is_refused(
        model_artifact, tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str) -> None:
    hostile = tmp_path / "hostile"
    shutil.copytree(model_artifact.directory, hostile)
    metadata = json.loads((hostile / "metadata.json").read_text())
    metadata["version"] = version
    (hostile / "metadata.json").write_text(json.dumps(metadata))
    data_dir = tmp_path / "a" / "b" / "data"
    code, _, err = run(capsys, "models", "import", str(hostile), "--data-dir", str(data_dir))
    assert code == EXIT_ERROR and "[invalid_model_name]" in err
    assert {p.name for p in tmp_path.iterdir()} <= {"a", "hostile"}
    assert not [p for p in tmp_path.rglob("*escaped*")]


def test_a_model_name_that_is_a_path_is_refused_before_training(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--folder", str(tmp_path), "--name", "../../outside")
    assert code == EXIT_ERROR and "[invalid_model_name]" in err


@pytest.mark.slow
def test_calibration_and_operating_point_fitted_at_training_are_applied_by_evaluate(
        cxr_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = small_csv(cxr_dir, tmp_path, per_class=5)
    dataset = ["--csv", str(csv_path), "--where", "site=shared"]
    code, out, err = run(capsys, "train", "--data-dir", str(tmp_path / "data"), *dataset, "--epochs", "1",
                         "--augment-copies", "1", "--test-fraction", "0.2", "--validation-fraction", "0.5",
                         "--calibration", "platt", "--target-sensitivity", "0.9", "--group-by", "site",
                         "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 0, err
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    calibration, operating = metadata["calibration"], metadata["operating_point"]
    assert calibration["method"] == "platt" and calibration["fitted_on"].startswith("the validation part")
    assert operating["rule"] == "sensitivity" and operating["target_sensitivity"] == 0.9
    assert metadata["decision_threshold"] == operating["threshold"]
    assert "calibrated (platt scaling fitted on the validation part" in out and "target sensitivity 0.9" in out
    code, out, err = run(capsys, "models", "evaluate", "--data-dir", str(tmp_path / "data"), "--artifact",
                         str(tmp_path / "run"), *dataset, "--part", "test", "--group-by", "site",
                         "--out", str(tmp_path / "eval"), "--no-progress")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())
    training = json.loads((tmp_path / "run" / "report.json").read_text())
    # the stored scaling and threshold applied offline reproduce the training report's calibrated scores
    assert [row["score"] for row in evaluated["predictions"]] == pytest.approx(
        [row["score"] for row in training["predictions"]], abs=1e-5)
    assert evaluated["metrics"]["confusion_matrix"] == metadata["metrics"]["test"]["confusion_matrix"]
    assert evaluated["calibration"]["calibrated"] and evaluated["subgroups"]["site"][0]["group"] == "shared"
    assert (tmp_path / "eval" / "reliability.png").is_file()


#: Real chest films of the shared DICOM set with different header facts (read with pydicom), by class.
SUBGROUP_FILES = {
    "covid": {"rg1.dcm": "pydicom-data__RG1_J2KI.dcm",
              "siim.dcm": "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"},
    "normal": {"dwv.dcm": "dwv__gdcm-CR-MONO1-10-chest.dcm", "mono.dcm": "orthanc-tests__Monochrome1-Jpeg.dcm"},
}
#: A header value with a terminal escape sequence (it clears the screen and sets the title when printed raw).
HOSTILE_MANUFACTURER = "Evil\x1b]0;pwned\x07\x1b[2JCorp"
#: The tables of the set below, counted by hand from the headers: rg1 (Philips, CR, PA, Philips Medical Systems
#: Hamburg, F, 60-69), siim (no Manufacturer or InstitutionName; CR, PA, M, 60-69), dwv (FUJI PHOTO FILM CO. LTD.,
#: CR, PA, FUJI PHOTO FILM CO.,, no sex or age), mono (KONICA MINOLTA, CR, an empty ViewPosition, nothing else),
#: hostile (dwv with another Manufacturer) and two PNG/JPEG (no header at all).
EXPECTED_SUBGROUPS = {
    "manufacturer": {"Philips Medical Systems": 1, "FUJI PHOTO FILM CO. LTD.": 1, "KONICA MINOLTA": 1,
                     "Evil\\x1b]0;pwned\\x07\\x1b[2JCorp": 1, "(missing)": 3},
    "modality": {"CR": 5, "(missing)": 2},
    "view_position": {"PA": 4, "(missing)": 3},
    "institution_name": {"Philips Medical Systems Hamburg": 1, "FUJI PHOTO FILM CO.,": 2, "(missing)": 4},
    "patient_sex": {"F": 1, "M": 1, "(missing)": 5},
    "age_band": {"60-69": 2, "(missing)": 5},
}


def first_picture(folder: Path) -> Path:
    return next(path for path in sorted(folder.iterdir()) if path.suffix.lower() in (".png", ".jpg", ".jpeg"))


def subgroup_set(dicom_dir: Path, cxr_dir: Path, folder: Path) -> list[Path]:
    """covid/ and normal/ with the films of :data:`SUBGROUP_FILES`, a hostile copy and a PNG/JPEG each; returns
    the DICOM files."""
    import pydicom

    copied = []
    for label, files in SUBGROUP_FILES.items():
        (folder / label).mkdir(parents=True)
        for name, source in files.items():
            copied.append(Path(shutil.copyfile(dicom_dir / source, folder / label / name)))
        picture = first_picture(cxr_dir / label)
        shutil.copyfile(picture, folder / label / f"{label}{picture.suffix}")
    hostile = pydicom.dcmread(dicom_dir / SUBGROUP_FILES["normal"]["dwv.dcm"])
    hostile.Manufacturer = HOSTILE_MANUFACTURER
    hostile.PatientID, hostile.PatientName, hostile.PatientBirthDate = "PID-SECRET-4711", "Doe^Jane", "19510203"
    hostile.save_as(folder / "normal" / "hostile.dcm")
    return [*copied, folder / "normal" / "hostile.dcm"]


def patient_identifiers(files: list[Path]) -> set[str]:
    """Every patient id, name and date the headers hold (what a report must never contain)."""
    import pydicom

    found = set()
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyDate", "AccessionNumber"):
            value = str(header.get(keyword) or "").strip()
            if len(value) >= 4:
                found.add(value)
    return found


@pytest.mark.slow
def test_evaluate_groups_dicom_files_by_their_header_facts(model_artifact, dicom_dir: Path, cxr_dir: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = subgroup_set(dicom_dir, cxr_dir, tmp_path / "set")
    identifiers = patient_identifiers(files)
    assert {"PID-SECRET-4711", "Doe^Jane", "19510203", "9RG1", "CompressedSamples^RG1"} <= identifiers
    data = ["--data-dir", str(tmp_path / "data"), "--artifact", str(model_artifact.directory), "--no-progress"]
    code, out, err = run(capsys, "models", "evaluate", *data, "--folder", str(tmp_path / "set"),
                         "--out", str(tmp_path / "eval"))
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["metrics"]["n"] == 7
    tables = {name: {row["group"]: row["n"] for row in rows} for name, rows in report["subgroups"].items()}
    assert tables == EXPECTED_SUBGROUPS
    assert "come from the DICOM headers" in out and "subgroups by patient_sex" in out
    text = (tmp_path / "eval" / "report.txt").read_text()
    written = text + (tmp_path / "eval" / "report.json").read_text()
    for identifier in identifiers:  # as a token of its own: "00000001" is in 0.6000000000000001, not an accession
        token = re.compile(rf"(?<![\w.]){re.escape(identifier)}(?!\w)")
        assert not token.search(written) and not token.search(out), "a patient identifier reached the report"
    assert "\x1b" not in out and "\x1b" not in written and "Evil\\x1b]0;pwned" in out

    # The four real films through a CSV: a --group-by column beside the header facts, and winning over one by name.
    with (tmp_path / "set.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "site", "view_position"])
        for label, names in SUBGROUP_FILES.items():
            for name in names:
                writer.writerow([f"set/{label}/{name}", label, name, "one", "as-listed"])
    code, out, err = run(capsys, "models", "evaluate", *data, "--csv", str(tmp_path / "set.csv"), "--group-by", "site",
                         "--group-by", "view_position", "--out", str(tmp_path / "eval-csv"))
    assert code == 0, err
    report = json.loads((tmp_path / "eval-csv" / "report.json").read_text())
    tables = {name: {row["group"]: row["n"] for row in rows} for name, rows in report["subgroups"].items()}
    assert tables == {
        "site": {"one": 4}, "view_position": {"as-listed": 4},
        "manufacturer": {"Philips Medical Systems": 1, "FUJI PHOTO FILM CO. LTD.": 1, "KONICA MINOLTA": 1,
                         "(missing)": 1},
        "modality": {"CR": 4},
        "institution_name": {"Philips Medical Systems Hamburg": 1, "FUJI PHOTO FILM CO.,": 1, "(missing)": 2},
        "patient_sex": {"F": 1, "M": 1, "(missing)": 2},
        "age_band": {"60-69": 2, "(missing)": 2},
    }
    assert list(tables)[:2] == ["site", "view_position"]
    assert "subgroup tables view_position come from the CSV, not from the DICOM headers" in out


def test_a_png_and_jpeg_only_set_has_no_header_subgroups(cxr_dir: Path, tmp_path: Path) -> None:
    from model_store.dataset import from_folder, load_images_with_headers
    from model_store.subgroups import header_attributes

    for label in CLASS_NAMES:
        (tmp_path / label).mkdir()
        picture = first_picture(cxr_dir / label)
        shutil.copyfile(picture, tmp_path / label / f"x{picture.suffix}")
    loaded = load_images_with_headers(from_folder(tmp_path, CLASS_NAMES), progress=False)
    assert loaded.headers == [{}, {}] and header_attributes(loaded.headers) == {}


def test_a_card_is_written_from_an_artifact_folder_without_a_database(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The published reference model's metadata (docs/reports) gives a card with its own figures."""
    published = Path(__file__).resolve().parents[1] / "docs" / "reports" / "cxr-plus-extra-lr1e-3" / "metadata.json"
    metadata = json.loads(published.read_text())
    folder = tmp_path / "artifact"
    folder.mkdir()
    shutil.copy(published, folder / "metadata.json")
    code, out, _ = run(capsys, "models", "card", "--artifact", str(folder))
    assert code == 0 and "model_card.md" in out
    card = (folder / "model_card.md").read_text()
    auc = metadata["metrics"]["test"]["roc_auc"]["value"]
    assert f"{auc:.3f}" in card and metadata["version"] in card and "NOT a medical device" in card
    assert (folder / "model_card.html").read_text().startswith("<!DOCTYPE html>")
    assert not (tmp_path / "data").exists()  # no data dir, no database touched
    code, _, err = run(capsys, "models", "card", "--artifact", str(tmp_path / "absent"))
    assert code == EXIT_ERROR and "[artifact_incomplete]" in err
    code, _, err = run(capsys, "models", "card", "covid-cxr:1", "--artifact", str(folder))
    assert code == EXIT_USAGE and "not both" in err
