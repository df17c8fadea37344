"""Training: split by patient, decode through ingest, cache the frozen prefix, fit the rest, save and report.

Defaults follow the origin (80/20, 25 epochs, batch 8, Adam 1e-3 with its time decay, rotation +-15 degrees,
frozen base), except that with random base weights the base's block 5 is trained (see ``trainable_from``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covid_cxr import constants
from covid_cxr.constants import CLASS_NAMES, POSITIVE_CLASS
from covid_cxr.errors import UsageError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from model_store import baseline
from model_store.architecture import (
    ARCHITECTURE,
    HEAD_LAYERS,
    INPUT_SCALING,
    INPUT_SHAPE,
    build_model,
    resolve_trainable_from,
    split_point,
)
from model_store.artifact import ArtifactInfo, save_artifact
from model_store.calibration import apply_calibration, calibration_summary, fit_calibration
from model_store.dataset import (
    Dataset,
    Split,
    describe_source,
    group_attributes,
    load_images_with_headers,
    manifest,
    split_dataset,
)
from model_store.drift import training_reference
from model_store.metrics import binary_report, degeneracy
from model_store.operating_point import OPERATING_POINT_RULES, choose_threshold
from model_store.report import compare_with_baseline, write_report
from model_store.subgroups import subgroup_metrics, with_header_attributes
from model_store.weights import describe_base_weights

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

#: With random base weights a frozen base is a random projection: measured here, the origin's frozen base +
#: head learned nothing useful (test accuracy 0.40), block 5 + head on cached block-4 outputs reached 0.90.
DEFAULT_TRAINABLE_FROM_WITHOUT_PRETRAINING = "block5"


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of one training run; all of them are stored in the artifact's metadata."""

    base_weights: str | None = None
    trainable_from: str | None = constants.TRAINABLE_FROM
    epochs: int = constants.EPOCHS
    batch_size: int = constants.TRAINING_BATCH_SIZE
    #: ``None``: the origin's 1e-3 for a head on a frozen base, 3e-5 when convolution blocks are trained too.
    learning_rate: float | None = None
    test_fraction: float = constants.TEST_FRACTION
    validation_fraction: float = constants.VALIDATION_FRACTION
    early_stopping_patience: int = constants.EARLY_STOPPING_PATIENCE
    augment: bool = True
    augment_copies: int = constants.AUGMENT_COPIES
    rotation_degrees: float = constants.ROTATION_DEGREES
    class_weight: str = constants.CLASS_WEIGHT
    early_stopping_metric: str = constants.EARLY_STOPPING_METRIC
    seed: int = constants.SEED
    threshold: float = constants.DECISION_THRESHOLD
    operating_point: str = "fixed"
    target_sensitivity: float | None = None
    calibration: str = "none"
    name: str = constants.MODEL_NAME

    def resolved_trainable_from(self) -> str | None:
        """``"auto"``: the origin's frozen base with pretrained weights, block 5 onwards without."""
        if self.trainable_from == "auto":
            pretrained = self.base_weights is not None and str(self.base_weights).lower() not in {"", "none"}
            return None if pretrained else DEFAULT_TRAINABLE_FROM_WITHOUT_PRETRAINING
        return resolve_trainable_from(self.trainable_from)

    def resolved_learning_rate(self) -> float:
        """The given rate; by default the origin's for a head on a frozen base, a lower one when convolution blocks
        are trained as well (at the origin's rate that fit collapsed to one class on imbalanced data)."""
        if self.learning_rate is not None:
            return self.learning_rate
        if self.resolved_trainable_from() is None:
            return constants.LEARNING_RATE
        return constants.LEARNING_RATE_FINE_TUNING

    def check(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1 (got {self.batch_size})")
        if self.learning_rate is not None and self.learning_rate <= 0:
            problems.append(f"learning rate must be > 0 (got {self.learning_rate})")
        if self.augment and self.augment_copies < 1:
            problems.append("augmentation needs --augment-copies >= 1 (or --no-augment)")
        if self.class_weight not in constants.CLASS_WEIGHT_MODES:
            modes = " or ".join(repr(mode) for mode in constants.CLASS_WEIGHT_MODES)
            problems.append(f"class weight must be {modes} (got {self.class_weight!r})")
        if self.early_stopping_metric not in constants.EARLY_STOPPING_METRICS:
            modes = " or ".join(repr(mode) for mode in constants.EARLY_STOPPING_METRICS)
            problems.append(f"early stopping metric must be {modes} (got {self.early_stopping_metric!r})")
        if not 0 < self.threshold < 1:
            problems.append(f"threshold must be in (0, 1) (got {self.threshold})")
        if self.operating_point not in OPERATING_POINT_RULES:
            problems.append(f"operating point must be one of {', '.join(OPERATING_POINT_RULES)} "
                            f"(got {self.operating_point!r})")
        if self.operating_point == "sensitivity" and not 0 < (self.target_sensitivity or 0) <= 1:
            problems.append(f"target sensitivity must be in (0, 1] (got {self.target_sensitivity})")
        if self.calibration not in constants.CALIBRATION_METHODS:
            methods = ", ".join(constants.CALIBRATION_METHODS)
            problems.append(f"calibration must be one of {methods} (got {self.calibration!r})")
        if (self.operating_point != "fixed" or self.calibration != "none") and self.validation_fraction <= 0:
            problems.append("choosing a threshold or calibrating needs a validation part (--validation-fraction > 0)")
        if problems:
            raise UsageError("bad training options: " + "; ".join(problems), reason=Reason.BAD_TRAINING_OPTIONS)


@dataclass(frozen=True)
class TrainingResult:
    """The saved artifact, the test report's files, and the evaluation they were written from."""

    artifact: ArtifactInfo
    report_files: dict[str, str]
    evaluation: dict[str, Any]


@dataclass(frozen=True)
class CachedFeatures:
    """The frozen prefix's outputs, computed once: ``train`` stacks the original training images and each
    augmented version of them; ``cut`` names the prefix's last layer."""

    cut: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class FitResult:
    """What fitting the trainable suffix left besides its weights: the curves per epoch and the class weights."""

    curves: dict[str, list[float]]
    class_weights: dict[str, float]
    early_stopping: bool
    monitor: str | None = None

    @property
    def best_epoch(self) -> int:
        """The epoch whose weights early stopping restored (best monitored value, first of ties), else the last."""
        if self.monitor and self.monitor in self.curves:
            values = np.asarray(self.curves[self.monitor])
            return int(np.argmin(values) if self.monitor == "val_loss" else np.argmax(values)) + 1
        return len(self.curves["loss"])


def train(dataset: Dataset, config: TrainingConfig, out_dir: Path, settings: Settings | None = None,
          progress: bool = True, feature_cache: Path | None = None, group_by: Sequence[str] = ()) -> TrainingResult:
    """Train one model and write its artifact and test-split report into ``out_dir``.

    ``feature_cache``: a folder where the frozen prefix's outputs are kept between runs on the same data,
    split, seed and augmentation (see :func:`features_cache_key`), so that trying another head recipe skips them.
    ``group_by``: CSV columns whose values get a subgroup table in the report. After fitting, the optional
    calibration and the operating point are fitted on the validation part; a degenerate model (one class for a
    whole part, or balanced accuracy at chance) is recorded as such in its metadata and report.

    Everything that can be wrong with the data (empty, one class, unreadable files, too few patients to
    split) raises :class:`DatasetError` before the model is built.
    """
    from model_store.features import split_model

    started = time.perf_counter()
    timings: dict[str, float] = {}
    config.check()
    trainable_from = config.resolved_trainable_from()
    split = split_dataset(dataset, config.test_fraction, config.validation_fraction, config.seed)
    group_attributes(dataset, group_by)  # an unknown --group-by column fails now, not after the fit
    with _timed(timings, "decode_s"):
        loaded = load_images_with_headers(dataset, settings, progress)
        images = loaded.images
    model = build_seeded_model(config, trainable_from)
    cut = split_point(trainable_from)
    prefix, suffix = split_model(model, cut)
    with _timed(timings, "features_s"):
        features = cached_features(prefix, cut, images, split, config, progress, feature_cache,
                                   features_cache_key(dataset, split, cut, config))
    with _timed(timings, "fit_s"):
        fit = fit_suffix(suffix, features, dataset.labels, split, config, progress)
    calibration, operating = calibrate_and_choose_threshold(suffix, features, dataset.labels, split, config)
    test_scores = apply_calibration(positive_scores(suffix, features.test), calibration)
    reference = drift_reference(suffix, features, images, split, calibration)
    evaluation = evaluate_test_part(dataset, split, images, test_scores, config, operating["threshold"], group_by,
                                    headers=[loaded.headers[i] for i in split.test])
    evaluation["calibration"] = calibration_summary(dataset.labels[split.test] == POSITIVE_CLASS, test_scores,
                                                    calibration)
    evaluation["operating_point"] = operating
    evaluation["degenerate"] = degenerate_parts(suffix, features, dataset.labels, split, calibration,
                                                operating["threshold"], evaluation["metrics"])
    timings["total_s"] = time.perf_counter() - started
    metadata = artifact_metadata(model, config, trainable_from, manifest(dataset, split), features, fit, reference,
                                 evaluation, timings)
    artifact = save_artifact(model, metadata, out_dir)
    evaluation["model"] = {"name": config.name, "version": artifact.version, "sha256": artifact.sha256}
    report_files = write_report(evaluation, out_dir, history=fit.curves)
    log.info("trained %s %s in %.0f s: %s", config.name, artifact.version, timings["total_s"], out_dir)
    return TrainingResult(artifact, report_files, evaluation)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    clock = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - clock


def build_seeded_model(config: TrainingConfig, trainable_from: str | None) -> keras.Model:
    """:func:`~model_store.architecture.build_model` after seeding Keras, so that initialisation repeats."""
    import keras

    keras.utils.set_random_seed(config.seed)
    return build_model(config.base_weights, trainable_from)


def cache_features(prefix: keras.Model | None, cut: str, images: np.ndarray, split: Split, config: TrainingConfig,
                   progress: bool) -> CachedFeatures:
    """Run the frozen prefix once over every part, and over each augmented version of the training images."""
    from model_store.features import augmented_copies, compute_features

    train_images = images[split.train]
    variants = [train_images]
    if config.augment:
        variants += list(augmented_copies(train_images, config.augment_copies, config.rotation_degrees, config.seed))
    train_features = np.stack([compute_features(prefix, variant, progress, f"features {i + 1}/{len(variants)}")
                               for i, variant in enumerate(variants)])
    validation = compute_features(prefix, images[split.validation], progress, "features validation")
    test = compute_features(prefix, images[split.test], progress, "features test")
    return CachedFeatures(cut, train_features, validation, test)


def features_cache_key(dataset: Dataset, split: Split, cut: str, config: TrainingConfig) -> str:
    """What the cached prefix outputs depend on: the files, the split, the prefix (its seeded initialisation and
    base weights), the augmentation and the pixel pipeline's version."""
    from ingest.pixels import PREPROCESSING_VERSION

    material = {"data": manifest(dataset)["sha256"], "split": {k: v.tolist() for k, v in split.parts().items()},
                "cut": cut, "seed": config.seed, "base_weights": describe_base_weights(config.base_weights),
                "augment": [config.augment, config.augment_copies, config.rotation_degrees],
                "preprocessing_version": PREPROCESSING_VERSION}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_features(prefix: keras.Model | None, cut: str, images: np.ndarray, split: Split, config: TrainingConfig,
                    progress: bool, cache_dir: Path | None, key: str) -> CachedFeatures:
    """:func:`cache_features`, read from (or written to) ``cache_dir/features-KEY.npz`` when a folder is given."""
    if cache_dir is None:
        return cache_features(prefix, cut, images, split, config, progress)
    path = Path(cache_dir) / f"features-{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            log.info("cached prefix outputs reused: %s", path)
            return CachedFeatures(str(stored["cut"]), stored["train"], stored["validation"], stored["test"])
    features = cache_features(prefix, cut, images, split, config, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, cut=np.array(features.cut), train=features.train, validation=features.validation,
             test=features.test)
    partial.replace(path)
    return features


def fit_suffix(suffix: keras.Model, features: CachedFeatures, labels: np.ndarray, split: Split,
               config: TrainingConfig, progress: bool) -> FitResult:
    """Fit the trainable suffix on the cached features: the origin's Adam with time decay, early stopping when
    there is a validation part, on ``config.early_stopping_metric`` (the origin's validation loss by default;
    balanced accuracy or AUC on request). A model that still predicts one class is caught afterwards by
    :func:`degenerate_parts`."""
    import keras

    weights, class_weights = _sample_weights(labels[split.train], config.class_weight)
    batches = _feature_batches(features.train, _one_hot(labels[split.train]), weights, config.batch_size, config.seed)
    rate = config.resolved_learning_rate()
    schedule = keras.optimizers.schedules.InverseTimeDecay(rate, decay_steps=1, decay_rate=rate / config.epochs)
    suffix.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss="categorical_crossentropy",
                   metrics=["accuracy"])
    callbacks: list[keras.callbacks.Callback] = []
    if len(split.validation):
        callbacks.append(_validation_callback(suffix, features.validation, labels[split.validation]))
        mode = "min" if config.early_stopping_metric == "val_loss" else "max"
        callbacks.append(keras.callbacks.EarlyStopping(monitor=config.early_stopping_metric, mode=mode,
                                                       patience=config.early_stopping_patience,
                                                       restore_best_weights=True))
    callbacks.append(_progress_callback(config.epochs, progress))
    history = suffix.fit(batches, epochs=config.epochs, callbacks=callbacks, verbose=0)
    curves = {key: [float(v) for v in values] for key, values in history.history.items()}
    monitor = config.early_stopping_metric if len(split.validation) else None
    return FitResult(curves, class_weights, early_stopping=monitor is not None, monitor=monitor)


def calibrate_and_choose_threshold(suffix: keras.Model, features: CachedFeatures, labels: np.ndarray, split: Split,
                                   config: TrainingConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the calibration (if asked), then choose the threshold on the calibrated scores, both on the validation
    part only (the test part stays untouched)."""
    if not len(split.validation):
        return {"method": "none"}, choose_threshold([], [], "fixed", fixed=config.threshold, chosen_on="given")
    is_positive = labels[split.validation] == POSITIVE_CLASS
    where = f"the validation part ({len(split.validation)} images)"
    raw = positive_scores(suffix, features.validation)
    calibration = fit_calibration(is_positive, raw, config.calibration, where)
    operating = choose_threshold(is_positive, apply_calibration(raw, calibration), config.operating_point,
                                 fixed=config.threshold, target_sensitivity=config.target_sensitivity,
                                 chosen_on=where if config.operating_point != "fixed" else "given")
    return calibration, operating


def degenerate_parts(suffix: keras.Model, features: CachedFeatures, labels: np.ndarray, split: Split,
                     calibration: dict[str, Any], threshold: float, test_metrics: dict[str, Any]) -> dict[str, Any]:
    """Whether the model is degenerate on the validation or the test part at its decision threshold."""
    reasons = list(degeneracy(test_metrics, "test"))
    if len(split.validation):
        scores = apply_calibration(positive_scores(suffix, features.validation), calibration)
        reasons = degeneracy(binary_report(labels[split.validation], scores, threshold=threshold, bootstrap=0),
                             "validation") + reasons
    return {"degenerate": bool(reasons), "reasons": reasons}


def positive_scores(suffix: keras.Model, features: np.ndarray) -> np.ndarray:
    """P(positive class) per image, from its cached features."""
    return np.asarray(suffix.predict(features, batch_size=32, verbose=0))[:, CLASS_NAMES.index(POSITIVE_CLASS)]


def drift_reference(suffix: keras.Model, features: CachedFeatures, images: np.ndarray, split: Split,
                    calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The reference the evaluation job compares served inputs with: the validation part, else the training part."""
    if len(split.validation):
        part, indices, part_features = "validation", split.validation, features.validation
    else:
        part, indices, part_features = "train", split.train, features.train[0]
    pixels = images[indices].reshape(len(indices), -1).astype(np.float64)
    scores = apply_calibration(positive_scores(suffix, part_features), calibration)
    reference = training_reference(scores, pixels.mean(axis=1), pixels.std(axis=1))
    reference["images"] = f"the {part} part ({len(indices)} images)"
    return reference


def artifact_metadata(model: keras.Model, config: TrainingConfig, trainable_from: str | None, data: dict[str, Any],
                      features: CachedFeatures, fit: FitResult, reference: dict[str, Any], evaluation: dict[str, Any],
                      timings: dict[str, float]) -> dict[str, Any]:
    """Everything the artifact records about how the model was built and trained, and how it scored."""
    import keras

    from ingest.pixels import PREPROCESSING_VERSION

    return {
        "name": config.name,
        "architecture": {
            "name": ARCHITECTURE,
            "base": "keras.applications.VGG16(include_top=False), blocks 1-5, 14,714,688 parameters",
            "head": list(HEAD_LAYERS),
            "input_shape": list(INPUT_SHAPE),
            "input_scaling": INPUT_SCALING,
            "trainable_from": trainable_from,
            "parameters": int(model.count_params()),
            "keras_version": keras.__version__,
            "backend": keras.backend.backend(),
        },
        "base_weights": describe_base_weights(config.base_weights),
        "preprocessing_version": PREPROCESSING_VERSION,
        "class_names": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "decision_threshold": evaluation["operating_point"]["threshold"],
        "operating_point": evaluation["operating_point"],
        "calibration": evaluation["calibration"]["method"],
        "degenerate": evaluation["degenerate"],
        "hyperparameters": {**asdict(config), "trainable_from": trainable_from, "optimizer": "Adam",
                            "learning_rate": config.resolved_learning_rate(),
                            "learning_rate_schedule": "InverseTimeDecay(lr, decay_steps=1, decay_rate=lr/epochs) "
                                                      "(the origin's Adam decay=lr/epochs)",
                            "loss": "categorical_crossentropy", "class_weights": fit.class_weights,
                            "early_stopping_on": fit.monitor},
        "data": data,
        "training": {
            "epochs_run": len(fit.curves["loss"]),
            "best_epoch": fit.best_epoch,
            "early_stopping": fit.early_stopping,
            "cached_prefix_until": features.cut,
            "cached_train_variants": len(features.train),
            "history": fit.curves,
            "timings": {key: round(value, 1) for key, value in timings.items()},
        },
        "reference": reference,
        "metrics": {"test": evaluation["metrics"], "baseline_test": evaluation["baseline"]["metrics"],
                    "shortcut_check": evaluation["baseline"]["comparison"],
                    "test_calibration": {key: evaluation["calibration"][key] for key in ("ece", "calibrated")},
                    "test_subgroups": evaluation.get("subgroups", {})},
    }


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.stack([(labels == name).astype(np.float32) for name in CLASS_NAMES], axis=1)


def _sample_weights(labels: np.ndarray, mode: str) -> tuple[np.ndarray, dict[str, float]]:
    if mode == "none":
        return np.ones(len(labels), dtype=np.float32), {name: 1.0 for name in CLASS_NAMES}
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.array(CLASS_NAMES, dtype=object), y=labels)
    per_class = dict(zip(CLASS_NAMES, (float(w) for w in weights), strict=False))
    return np.array([per_class[label] for label in labels], dtype=np.float32), per_class


def _feature_batches(features: np.ndarray, targets: np.ndarray, weights: np.ndarray, batch_size: int,
                     seed: int) -> keras.utils.PyDataset:
    import keras

    copies, count = int(features.shape[0]), int(features.shape[1])

    class CachedFeatureBatches(keras.utils.PyDataset):  # type: ignore[misc]  # keras ships no type information
        """Shuffled batches of cached features; each epoch draws, per image, one of its augmented copies."""

        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order, self.copy = self._draw()

        def _draw(self) -> tuple[np.ndarray, np.ndarray]:
            return self.rng.permutation(count), self.rng.integers(0, copies, size=count)

        def __len__(self) -> int:
            return math.ceil(count / batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            chosen = self.order[index * batch_size:(index + 1) * batch_size]
            return features[self.copy[chosen], chosen], targets[chosen], weights[chosen]

        def on_epoch_end(self) -> None:
            self.order, self.copy = self._draw()

    return CachedFeatureBatches()


def _validation_callback(suffix: keras.Model, features: np.ndarray, labels: np.ndarray) -> keras.callbacks.Callback:
    """Adds ``val_loss``, ``val_accuracy``, ``val_balanced_accuracy`` and ``val_auc`` to each epoch's logs, from one
    pass over the validation part (before early stopping reads them)."""
    import keras
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    targets = _one_hot(labels)
    positive = labels == POSITIVE_CLASS

    def measure(epoch: int, logs: dict[str, float] | None = None) -> None:
        if logs is None:
            return
        probabilities = np.clip(np.asarray(suffix.predict(features, batch_size=32, verbose=0)), 1e-7, 1.0)
        predicted = np.asarray(CLASS_NAMES, dtype=object)[probabilities.argmax(axis=1)]
        logs["val_loss"] = float(-(targets * np.log(probabilities)).sum(axis=1).mean())
        logs["val_accuracy"] = float((predicted == labels).mean())
        logs["val_balanced_accuracy"] = float(balanced_accuracy_score(labels, predicted))
        scores = probabilities[:, CLASS_NAMES.index(POSITIVE_CLASS)]
        logs["val_auc"] = float(roc_auc_score(positive, scores)) if 0 < positive.sum() < len(positive) else 0.5

    return keras.callbacks.LambdaCallback(on_epoch_end=measure)


def _progress_callback(epochs: int, enabled: bool) -> keras.callbacks.Callback:
    """A progress bar over the epochs that shows the loss and accuracy of each."""
    import keras
    from tqdm import tqdm

    bar = tqdm(total=epochs, desc="train", unit="epoch", disable=not enabled)

    def show_epoch(epoch: int, logs: dict[str, float] | None = None) -> None:
        bar.set_postfix({key: f"{value:.3f}" for key, value in (logs or {}).items()
                         if key in {"loss", "accuracy", "val_loss", "val_accuracy"}})
        bar.update(1)

    def close(logs: dict[str, float] | None = None) -> None:
        bar.close()

    return keras.callbacks.LambdaCallback(on_epoch_end=show_epoch, on_train_end=close)


def evaluate_test_part(dataset: Dataset, split: Split, images: np.ndarray, test_scores: np.ndarray,
                       config: TrainingConfig, threshold: float | None = None,
                       group_by: Sequence[str] = (),
                       headers: Sequence[Mapping[str, str | None]] = ()) -> dict[str, Any]:
    """The held-out test part's report, with the thumbnail baseline fitted on train + validation; subgroup tables
    for the ``group_by`` CSV columns and for the header facts of the test part's DICOM files (``headers``, in the
    test part's order)."""
    labels = dataset.labels
    fitted_on = np.concatenate([split.train, split.validation])
    baseline_scores = baseline.fit_and_score(images[fitted_on], labels[fitted_on] == POSITIVE_CLASS,
                                             images[split.test], config.seed)
    threshold = config.threshold if threshold is None else threshold
    model_metrics = binary_report(labels[split.test], test_scores, threshold=threshold, seed=config.seed)
    baseline_metrics = binary_report(labels[split.test], baseline_scores, threshold=0.5, seed=config.seed)
    test_counts = dataset.counts(split.test)
    notes: list[str] = []
    attributes = with_header_attributes(group_attributes(dataset.subset(split.test), group_by), headers, notes)
    return {
        "title": f"held-out test part ({split.method})",
        "data_description": (f"{describe_source(dataset.source)}; test part {len(split.test)} images "
                             f"({', '.join(f'{v} {k}' for k, v in test_counts.items())}) of "
                             f"{len({dataset.items[i].patient_id for i in split.test})} patients"),
        "part": "test",
        "metrics": model_metrics,
        "baseline": {"method": baseline.METHOD,
                     "fitted_on": f"the training + validation parts ({len(fitted_on)} images)",
                     "metrics": baseline_metrics, "comparison": compare_with_baseline(model_metrics, baseline_metrics)},
        "predictions": [
            {"key": dataset.items[i].key, "label": dataset.items[i].label, "patient_id": dataset.items[i].patient_id,
             "score": float(score), "baseline_score": float(base)}
            for i, score, base in zip(split.test, test_scores, baseline_scores, strict=False)
        ],
        "subgroups": subgroup_metrics(labels[split.test], test_scores, attributes, model_metrics,
                                      threshold=threshold, seed=config.seed),
        **({"notes": notes} if notes else {}),
    }

