"""Training end to end on a few real images, the artifact's integrity, and training path == serving path."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from covid_cxr.constants import CLASS_NAMES
from covid_cxr.errors import DatasetError, ModelIntegrityError, UsageError
from covid_cxr.hashing import file_sha256
from model_store.architecture import build_model, to_model_input
from model_store.artifact import REQUIRED_METADATA, load_verified_model, read_metadata, save_artifact
from model_store.dataset import Split, from_csv, from_folder
from model_store.features import compute_features, split_model
from model_store.training import CachedFeatures, FitResult, TrainingConfig, cache_features, drift_reference, train

PER_CLASS = 4  # patients per class: 2 train, 1 validation, 1 test


def write_small_csv(cxr_dir: Path, target: Path, per_class: int = PER_CLASS) -> Path:
    """A CSV of real covid and normal images, one per patient, with absolute paths."""
    with (cxr_dir / "metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = []
    for label in CLASS_NAMES:
        seen: set[str] = set()
        for row in rows:
            if row["label"] == label and not row["subset"] and row["patient_id"] not in seen and len(seen) < per_class:
                seen.add(row["patient_id"])
                chosen.append(row)
    target.mkdir(parents=True, exist_ok=True)
    path = target / "small.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "view"])
        for row in chosen:
            writer.writerow([str(cxr_dir / row["file"]), row["label"], row["patient_id"], row["view"]])
    return path


SMALL_CONFIG = TrainingConfig(epochs=1, test_fraction=0.25, validation_fraction=0.34, augment_copies=1, seed=3)


@pytest.fixture(scope="module")
def trained(cxr_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("training")
    dataset = from_csv(write_small_csv(cxr_dir, root), CLASS_NAMES)
    return dataset, train(dataset, SMALL_CONFIG, root / "run", progress=False, group_by=["view"])


@pytest.mark.slow
def test_training_writes_a_complete_artifact(trained) -> None:  # type: ignore[no-untyped-def]
    from ingest.pixels import PREPROCESSING_VERSION

    dataset, result = trained
    artifact = result.artifact
    assert artifact.model_path.is_file() and artifact.metadata_path.is_file()
    metadata = read_metadata(artifact.directory)
    assert set(REQUIRED_METADATA) <= set(metadata)
    assert metadata["sha256"] == file_sha256(artifact.model_path) == artifact.sha256
    assert re.fullmatch(r"\d{8}-\d{6}-" + metadata["sha256"][:8], metadata["version"])
    assert metadata["preprocessing_version"] == PREPROCESSING_VERSION
    assert metadata["class_names"] == ["covid", "normal"] and metadata["decision_threshold"] == 0.5
    assert metadata["base_weights"] == {"source": "none"}
    assert metadata["architecture"]["trainable_from"] == "block5"  # the documented default without pretraining
    assert metadata["hyperparameters"]["epochs"] == 1 and metadata["hyperparameters"]["batch_size"] == 8
    assert metadata["hyperparameters"]["learning_rate"] == 3e-5  # resolved, not the "default" None
    data = metadata["data"]
    assert data["counts"] == {"covid": PER_CLASS, "normal": PER_CLASS} and len(data["sha256"]) == 64
    split = data["split"]
    assert split["test"]["counts"] == {"covid": 1, "normal": 1}
    all_patients = set().union(*(set(split[part]["patient_ids"]) for part in ("train", "validation", "test")))
    assert all_patients == set(dataset.groups)
    assert metadata["training"]["epochs_run"] == 1 and metadata["training"]["cached_prefix_until"] == "block4_pool"
    assert metadata["metrics"]["test"]["n"] == 2
    assert "beats_baseline" in metadata["metrics"]["shortcut_check"]
    assert metadata["reference"]["prob_covid"]["n"] == 2  # the validation part
    assert metadata["calibration"] == {"method": "none"} and metadata["operating_point"]["rule"] == "fixed"
    assert set(metadata["degenerate"]) == {"degenerate", "reasons"}
    assert sum(row["n"] for row in metadata["metrics"]["test_subgroups"]["view"]) == 2


@pytest.mark.slow
def test_the_model_card_states_the_figures_of_the_report_it_cites(trained) -> None:  # type: ignore[no-untyped-def]
    from model_store.card import card_context, render_card
    from model_store.metrics import format_proportion
    from model_store.report_render import interval_text

    _, result = trained
    metadata = read_metadata(result.artifact.directory)
    report = json.loads(Path(result.report_files["json"]).read_text())
    markdown, html = render_card(card_context(metadata))
    figures = [format_proportion(report["metrics"][key]) for key in ("accuracy", "sensitivity", "specificity")]
    figures += [format_proportion(report["baseline"]["metrics"]["accuracy"]), metadata["version"],
                metadata["data"]["sha256"], "NOT a medical device", "Known limitations", "by view"]
    if report["metrics"]["roc_auc"]["value"] is not None:
        figures.append(interval_text(report["metrics"]["roc_auc"]))
    for figure in figures:
        assert figure in markdown and figure in html
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html


@pytest.mark.slow
def test_training_writes_the_report_and_plots(trained) -> None:  # type: ignore[no-untyped-def]
    _, result = trained
    files = result.report_files
    text = Path(files["text"]).read_text()
    for expected in ("acc:", "sensitivity:", "specificity:", "95% CI", "ROC AUC", "Brier", "precision",
                     "confusion matrix", "shortcut check: logistic regression", result.artifact.version):
        assert expected in text
    assert "calibration: scores NOT calibrated" in text and "expected calibration error" in text
    assert "operating point: threshold 0.5000 (given)" in text and "subgroups by view" in text
    for kind in ("confusion_matrix", "roc_curve", "training_curves", "reliability"):
        assert Path(files[kind]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(Path(files["json"]).read_text())
    assert len(report["predictions"]) == 2 and report["metrics"]["n"] == 2


@pytest.mark.slow
def test_training_path_and_serving_path_give_the_same_probabilities(trained) -> None:  # type: ignore[no-untyped-def]
    """The test scores computed during training (cached features) equal a worker's (file -> ingest -> model)."""
    from ingest.pixels import load_image_file, normalize_grayscale

    dataset, result = trained
    model = load_verified_model(result.artifact.model_path, result.artifact.sha256)
    predictions = result.evaluation["predictions"]
    by_key = {item.key: item for item in dataset.items}
    images = np.stack([normalize_grayscale(load_image_file(by_key[row["key"]].path)) for row in predictions])
    served = np.asarray(model(to_model_input(images), training=False))
    np.testing.assert_allclose(served[:, 0], [row["score"] for row in predictions], atol=1e-5)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_tampered_artifact_is_refused(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, result = trained
    copy = tmp_path / "model.keras"
    shutil.copy(result.artifact.model_path, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256") as caught:
        load_verified_model(copy, result.artifact.sha256)
    assert caught.value.reason == "sha256_mismatch"


@pytest.mark.slow
def test_unsafe_artifact_is_refused_even_with_a_matching_sha256(tmp_path: Path) -> None:
    """A Lambda layer carries Python bytecode; Keras safe mode refuses it and so do we."""
    import keras

    inputs = keras.Input((224, 224, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Lambda(lambda x: keras.ops.softmax(x[:, :2]))(pooled)
    info = save_artifact(keras.Model(inputs, outputs), {"name": "evil"}, tmp_path / "evil")
    with pytest.raises(ModelIntegrityError, match="safe mode") as caught:
        load_verified_model(info.model_path, info.sha256)
    assert caught.value.reason == "unsafe_or_invalid"


@pytest.mark.slow
@pytest.mark.parametrize("trainable_from", ["block5", None])
def test_cached_prefix_plus_suffix_equals_the_full_model(trainable_from: str | None) -> None:
    from model_store.architecture import split_point

    model = build_model(None, trainable_from)
    prefix, suffix = split_model(model, split_point(trainable_from))
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224), dtype=np.uint8)
    cached = np.asarray(suffix(compute_features(prefix, images, progress=False), training=False))
    full = np.asarray(model(to_model_input(images), training=False))
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)
    assert suffix.layers[-1] is model.layers[-1]  # shared layers: training the suffix trains the model


def _refuse_to_build(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("the model was built although the data are unusable")


def test_unreadable_images_stop_training_before_the_model_is_built(cxr_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("model_store.training.build_model", _refuse_to_build)
    folder = tmp_path / "set"
    for label in CLASS_NAMES:
        (folder / label).mkdir(parents=True)
        for index in range(6):
            (folder / label / f"{index}.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot be used") as caught:
        train(from_folder(folder, CLASS_NAMES), SMALL_CONFIG, tmp_path / "run", progress=False)
    assert caught.value.reason == "unreadable_images"
    assert not (tmp_path / "run").exists()


def test_too_few_patients_stop_training_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("model_store.training.build_model", _refuse_to_build)
    monkeypatch.setattr("model_store.training.load_images_with_headers", _refuse_to_build)
    folder = tmp_path / "set"
    (folder / "covid").mkdir(parents=True)
    (folder / "normal").mkdir()
    (folder / "covid" / "a.png").write_bytes(b"x")
    (folder / "normal" / "b.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="too few patients"):
        train(from_folder(folder, CLASS_NAMES), TrainingConfig(), tmp_path / "run", progress=False)


def test_bad_options_are_refused() -> None:
    with pytest.raises(UsageError, match="epochs must be >= 1"):
        TrainingConfig(epochs=0).check()
    with pytest.raises(UsageError, match="class weight"):
        TrainingConfig(class_weight="inverse").check()
    with pytest.raises(UsageError, match="early stopping metric"):
        TrainingConfig(early_stopping_metric="accuracy").check()
    with pytest.raises(UsageError, match="target sensitivity"):
        TrainingConfig(operating_point="sensitivity").check()
    with pytest.raises(UsageError, match="needs a validation part"):
        TrainingConfig(calibration="temperature", validation_fraction=0).check()


def test_prefix_outputs_are_cached_on_disk_and_reused(tmp_path: Path) -> None:
    from model_store.training import cached_features

    images = np.random.default_rng(0).integers(0, 256, (4, 224, 224), dtype=np.uint8)
    config = TrainingConfig(augment=False)
    first = cached_features(None, "input", images, _split([0, 1], [2], [3]), config, False, tmp_path, "k1")
    assert (tmp_path / "features-k1.npz").is_file()

    class Exploding:
        def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise AssertionError("the prefix ran although its outputs were cached")

    again = cached_features(Exploding(), "block4_pool", images, _split([0, 1], [2], [3]), config, False, tmp_path,
                            "k1")
    assert again.cut == "input" and np.array_equal(again.train, first.train)
    assert np.array_equal(again.test, first.test)


def test_trainable_from_auto_depends_on_the_base_weights() -> None:
    assert TrainingConfig(base_weights=None).resolved_trainable_from() == "block5"
    assert TrainingConfig(base_weights="none").resolved_trainable_from() == "block5"
    assert TrainingConfig(base_weights="imagenet").resolved_trainable_from() is None
    assert TrainingConfig(base_weights="/weights/notop.h5").resolved_trainable_from() is None
    assert TrainingConfig(base_weights=None, trainable_from="block4").resolved_trainable_from() == "block4"
    assert TrainingConfig(base_weights=None, trainable_from="none").resolved_trainable_from() is None


def test_the_default_learning_rate_is_lower_when_convolution_blocks_are_trained() -> None:
    assert TrainingConfig(base_weights=None).resolved_learning_rate() == 3e-5  # block 5 from random weights
    assert TrainingConfig(base_weights="imagenet").resolved_learning_rate() == 1e-3  # the origin's head-only fit
    assert TrainingConfig(base_weights="imagenet", trainable_from="block5").resolved_learning_rate() == 3e-5
    assert TrainingConfig(base_weights=None, learning_rate=1e-3).resolved_learning_rate() == 1e-3
    with pytest.raises(UsageError, match="learning rate must be > 0"):
        TrainingConfig(learning_rate=0).check()


def _split(train: list[int], validation: list[int], test: list[int]) -> Split:
    return Split(np.array(train), np.array(validation), np.array(test), "test", 0, 0.25, 0.25)


def test_features_are_cached_for_each_training_version_and_each_held_out_part() -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 224, 224), dtype=np.uint8)
    config = TrainingConfig(augment_copies=2, seed=1)
    features = cache_features(None, "input", images, _split([0, 1], [2], [3]), config, progress=False)
    assert features.train.shape == (3, 2, 224, 224, 3)  # the originals, then two rotated versions
    np.testing.assert_array_equal(features.train[0], to_model_input(images[:2]))
    assert not np.array_equal(features.train[1], features.train[0])
    np.testing.assert_array_equal(features.test, to_model_input(images[3:]))
    unaugmented = TrainingConfig(augment=False)
    assert cache_features(None, "input", images, _split([0, 1], [2], [3]), unaugmented, False).train.shape[0] == 1


class _ConstantSuffix:
    """Predicts the same probabilities for every image, as the trained suffix would on cached features."""

    def predict(self, features: np.ndarray, batch_size: int, verbose: int) -> np.ndarray:
        return np.tile([[0.8, 0.2]], (len(features), 1))


def test_the_drift_reference_is_the_validation_part_else_the_training_part() -> None:
    images = np.full((3, 224, 224), 100, dtype=np.uint8)
    features = CachedFeatures("input", np.zeros((1, 2, 1)), np.zeros((1, 1)), np.zeros((0, 1)))
    reference = drift_reference(_ConstantSuffix(), features, images, _split([0, 1], [2], []))
    assert reference["images"] == "the validation part (1 images)"
    assert reference["prob_covid"]["mean"] == pytest.approx(0.8) and reference["image_mean"]["mean"] == 100
    without_validation = drift_reference(_ConstantSuffix(), features, images, _split([0, 1], [], [2]))
    assert without_validation["images"] == "the train part (2 images)"


def test_the_best_epoch_is_the_lowest_validation_loss_else_the_last() -> None:
    assert FitResult({"loss": [3, 2, 1], "val_loss": [2, 1, 1.5]}, {}, True, "val_loss").best_epoch == 2
    assert FitResult({"loss": [3, 2, 1], "val_balanced_accuracy": [0.5, 0.7, 0.7]}, {}, True,
                     "val_balanced_accuracy").best_epoch == 2
    assert FitResult({"loss": [3, 2, 1]}, {}, False).best_epoch == 3


def test_the_test_report_has_header_tables_beside_the_csv_columns() -> None:
    """Training's report groups the test part's DICOM files by their header facts, as offline evaluation does."""
    from model_store.dataset import Dataset, Item
    from model_store.training import evaluate_test_part

    labels = ["covid", "normal"] * 6
    items = [Item(Path(f"{i}.dcm"), label, f"p{i}", f"{i}.dcm", {"site": "a" if i < 6 else "b"})
             for i, label in enumerate(labels)]
    dataset = Dataset(items, {"kind": "csv", "path": "x.csv", "label_column": "label"}, CLASS_NAMES, True)
    split = Split(np.arange(0, 4), np.arange(4, 6), np.arange(6, 12), "given", 0, 0.5, 0.2)
    images = np.random.default_rng(0).integers(0, 256, size=(12, 224, 224), dtype=np.uint8)
    headers = [{"manufacturer": "ACME", "patient_sex": "F"}, {"manufacturer": "ACME"}, {}, {"manufacturer": "Zeta"},
               {"manufacturer": "Zeta", "patient_sex": "M"}, {}]  # the test part's six, in its order
    scores = np.linspace(0.1, 0.9, 6)
    report = evaluate_test_part(dataset, split, images, scores, SMALL_CONFIG, 0.5, ["site"], headers=headers)
    tables = {name: {row["group"]: row["n"] for row in rows} for name, rows in report["subgroups"].items()}
    assert tables == {"site": {"b": 6}, "manufacturer": {"ACME": 2, "Zeta": 2, "(missing)": 2},
                      "patient_sex": {"F": 1, "M": 1, "(missing)": 4}}
    assert any("come from the DICOM headers" in note for note in report["notes"])
    plain = evaluate_test_part(dataset, split, images, scores, SMALL_CONFIG, 0.5, ["site"])
    assert set(plain["subgroups"]) == {"site"} and "notes" not in plain
