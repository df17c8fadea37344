"""Training: split by patient, decode through ingest, cache the frozen prefix, fit the rest, save and report.

Defaults follow the origin (80/20, 25 epochs, batch 8, Adam 1e-3 with its time decay, rotation +-15 degrees,
frozen base), except that with random base weights the base's block 5 is trained (see ``trainable_from``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covid_cxr import constants
from covid_cxr.constants import CLASS_NAMES, POSITIVE_CLASS
from covid_cxr.errors import DatasetError
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
from model_store.dataset import Dataset, Split, describe_source, load_images, manifest, split_dataset
from model_store.drift import training_reference
from model_store.metrics import binary_report
from model_store.report import compare_with_baseline, write_report
from model_store.weights import describe_base_weights

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
    learning_rate: float = constants.LEARNING_RATE
    test_fraction: float = constants.TEST_FRACTION
    validation_fraction: float = constants.VALIDATION_FRACTION
    early_stopping_patience: int = constants.EARLY_STOPPING_PATIENCE
    augment: bool = True
    augment_copies: int = constants.AUGMENT_COPIES
    rotation_degrees: float = constants.ROTATION_DEGREES
    class_weight: str = constants.CLASS_WEIGHT
    seed: int = constants.SEED
    threshold: float = constants.DECISION_THRESHOLD
    name: str = constants.MODEL_NAME

    def resolved_trainable_from(self) -> str | None:
        """``"auto"``: the origin's frozen base with pretrained weights, block 5 onwards without."""
        if self.trainable_from == "auto":
            pretrained = self.base_weights is not None and str(self.base_weights).lower() not in {"", "none"}
            return None if pretrained else DEFAULT_TRAINABLE_FROM_WITHOUT_PRETRAINING
        return resolve_trainable_from(self.trainable_from)

    def check(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1 (got {self.batch_size})")
        if self.learning_rate <= 0:
            problems.append(f"learning rate must be > 0 (got {self.learning_rate})")
        if self.augment and self.augment_copies < 1:
            problems.append("augmentation needs --augment-copies >= 1 (or --no-augment)")
        if self.class_weight not in constants.CLASS_WEIGHT_MODES:
            modes = " or ".join(repr(mode) for mode in constants.CLASS_WEIGHT_MODES)
            problems.append(f"class weight must be {modes} (got {self.class_weight!r})")
        if not 0 < self.threshold < 1:
            problems.append(f"threshold must be in (0, 1) (got {self.threshold})")
        if problems:
            raise DatasetError("bad training options: " + "; ".join(problems), reason="bad_training_options")


@dataclass(frozen=True)
class TrainingResult:
    artifact: ArtifactInfo
    report_files: dict[str, str]
    evaluation: dict[str, Any]


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.stack([(labels == name).astype(np.float32) for name in CLASS_NAMES], axis=1)


def _sample_weights(labels: np.ndarray, mode: str) -> tuple[np.ndarray, dict[str, float]]:
    if mode == "none":
        return np.ones(len(labels), dtype=np.float32), {name: 1.0 for name in CLASS_NAMES}
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.array(CLASS_NAMES, dtype=object), y=labels)
    per_class = dict(zip(CLASS_NAMES, (float(w) for w in weights), strict=False))
    return np.array([per_class[label] for label in labels], dtype=np.float32), per_class


def _batches_class():  # type: ignore[no-untyped-def]
    import keras

    class CachedFeatureBatches(keras.utils.PyDataset):
        """Shuffled batches of cached features; each epoch draws, per image, one of its augmented copies."""

        def __init__(self, features: np.ndarray, targets: np.ndarray, weights: np.ndarray, batch_size: int,
                     seed: int) -> None:
            super().__init__()
            self.features, self.targets, self.weights = features, targets, weights
            self.batch_size = batch_size
            self.rng = np.random.default_rng(seed)
            self._draw()

        def _draw(self) -> None:
            count = self.features.shape[1]
            self.order = self.rng.permutation(count)
            self.copy = self.rng.integers(0, self.features.shape[0], count)

        def __len__(self) -> int:
            return math.ceil(self.features.shape[1] / self.batch_size)

        def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
            chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
            return self.features[self.copy[chosen], chosen], self.targets[chosen], self.weights[chosen]

        def on_epoch_end(self) -> None:
            self._draw()

    return CachedFeatureBatches


def _progress_callback(epochs: int, enabled: bool):  # type: ignore[no-untyped-def]
    import keras
    from tqdm import tqdm

    class EpochProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # type: ignore[no-untyped-def]
            self.bar = tqdm(total=epochs, desc="train", unit="epoch", disable=not enabled)

        def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            self.bar.set_postfix({key: f"{value:.3f}" for key, value in (logs or {}).items()
                                  if key in {"loss", "accuracy", "val_loss", "val_accuracy"}})
            self.bar.update(1)

        def on_train_end(self, logs=None):  # type: ignore[no-untyped-def]
            self.bar.close()

    return EpochProgress()


def train(dataset: Dataset, config: TrainingConfig, out_dir: Path, settings: Settings | None = None,
          progress: bool = True) -> TrainingResult:
    """Train one model and write its artifact and test-split report into ``out_dir``.

    Everything that can be wrong with the data (empty, one class, unreadable files, too few patients to
    split) raises :class:`DatasetError` before the model is built.
    """
    import keras

    from ingest.pixels import PREPROCESSING_VERSION

    started = time.perf_counter()
    config.check()
    trainable_from = config.resolved_trainable_from()
    split = split_dataset(dataset, config.test_fraction, config.validation_fraction, config.seed)
    timings: dict[str, float] = {}

    clock = time.perf_counter()
    images = load_images(dataset, settings, progress)
    timings["decode_s"] = time.perf_counter() - clock

    keras.utils.set_random_seed(config.seed)
    model = build_model(config.base_weights, trainable_from)
    from model_store.features import augmented_copies, compute_features, split_model

    cut = split_point(trainable_from)
    prefix, suffix = split_model(model, cut)
    labels = dataset.labels

    clock = time.perf_counter()
    train_images = images[split.train]
    variants = [train_images]
    if config.augment:
        variants += list(augmented_copies(train_images, config.augment_copies, config.rotation_degrees, config.seed))
    train_features = np.stack([compute_features(prefix, variant, progress, f"features {i + 1}/{len(variants)}")
                               for i, variant in enumerate(variants)])
    validation_features = compute_features(prefix, images[split.validation], progress, "features validation")
    test_features = compute_features(prefix, images[split.test], progress, "features test")
    timings["features_s"] = time.perf_counter() - clock

    weights, class_weights = _sample_weights(labels[split.train], config.class_weight)
    batches = _batches_class()(train_features, _one_hot(labels[split.train]), weights, config.batch_size, config.seed)
    schedule = keras.optimizers.schedules.InverseTimeDecay(
        config.learning_rate, decay_steps=1, decay_rate=config.learning_rate / config.epochs)
    suffix.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss="categorical_crossentropy",
                   metrics=["accuracy"])
    callbacks = [_progress_callback(config.epochs, progress)]
    validation_data = None
    if len(split.validation):
        validation_data = (validation_features, _one_hot(labels[split.validation]))
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience,
                                                       restore_best_weights=True))
    clock = time.perf_counter()
    history = suffix.fit(batches, epochs=config.epochs, validation_data=validation_data, callbacks=callbacks,
                         verbose=0)
    timings["fit_s"] = time.perf_counter() - clock
    curves = {key: [float(v) for v in values] for key, values in history.history.items()}
    best_epoch = int(np.argmin(curves["val_loss"])) + 1 if "val_loss" in curves else len(curves["loss"])

    test_scores = np.asarray(suffix.predict(test_features, batch_size=32, verbose=0))[:, 0]
    reference_part = "validation" if len(split.validation) else "train"
    reference_indices = split.validation if len(split.validation) else split.train
    reference_features = validation_features if len(split.validation) else train_features[0]
    reference_scores = np.asarray(suffix.predict(reference_features, batch_size=32, verbose=0))[:, 0]
    reference_images = images[reference_indices].reshape(len(reference_indices), -1).astype(np.float64)
    reference = training_reference(reference_scores, reference_images.mean(axis=1), reference_images.std(axis=1))
    reference["images"] = f"the {reference_part} part ({len(reference_indices)} images)"
    evaluation = _test_evaluation(dataset, split, images, test_scores, config)
    timings["total_s"] = time.perf_counter() - started

    metadata = {
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
        "decision_threshold": config.threshold,
        "hyperparameters": {**asdict(config), "trainable_from": trainable_from, "optimizer": "Adam",
                            "learning_rate_schedule": "InverseTimeDecay(lr, decay_steps=1, decay_rate=lr/epochs) "
                                                      "(the origin's Adam decay=lr/epochs)",
                            "loss": "categorical_crossentropy", "class_weights": class_weights},
        "data": manifest(dataset, split),
        "training": {
            "epochs_run": len(curves["loss"]),
            "best_epoch": best_epoch,
            "early_stopping": validation_data is not None,
            "cached_prefix_until": cut,
            "cached_train_variants": len(variants),
            "history": curves,
            "timings": {key: round(value, 1) for key, value in timings.items()},
        },
        "reference": reference,
        "metrics": {"test": evaluation["metrics"], "baseline_test": evaluation["baseline"]["metrics"],
                    "shortcut_check": evaluation["baseline"]["comparison"]},
    }
    artifact = save_artifact(model, metadata, out_dir)
    evaluation["model"] = {"name": config.name, "version": artifact.version, "sha256": artifact.sha256}
    report_files = write_report(evaluation, out_dir, history=curves)
    log.info("trained %s %s in %.0f s: %s", config.name, artifact.version, timings["total_s"], out_dir)
    return TrainingResult(artifact, report_files, evaluation)


def _test_evaluation(dataset: Dataset, split: Split, images: np.ndarray, test_scores: np.ndarray,
                     config: TrainingConfig) -> dict[str, Any]:
    """The held-out test part's report, with the thumbnail baseline fitted on train + validation."""
    labels = dataset.labels
    fitted_on = np.concatenate([split.train, split.validation])
    baseline_scores = baseline.fit_and_score(images[fitted_on], labels[fitted_on] == POSITIVE_CLASS,
                                             images[split.test], config.seed)
    model_metrics = binary_report(labels[split.test], test_scores, threshold=config.threshold, seed=config.seed)
    baseline_metrics = binary_report(labels[split.test], baseline_scores, threshold=0.5, seed=config.seed)
    test_counts = dataset.counts(split.test)
    return {
        "title": f"held-out test part ({split.method})",
        "data_description": (f"{describe_source(dataset.source)}; test part {len(split.test)} images "
                             f"({', '.join(f'{v} {k}' for k, v in test_counts.items())}) of "
                             f"{len({dataset.items[i].patient_id for i in split.test})} patients"),
        "part": "test",
        "metrics": model_metrics,
        "baseline": {"method": baseline.METHOD, "fitted_on": f"the training + validation parts ({len(fitted_on)} images)",
                     "metrics": baseline_metrics, "comparison": compare_with_baseline(model_metrics, baseline_metrics)},
        "predictions": [
            {"key": dataset.items[i].key, "label": dataset.items[i].label, "patient_id": dataset.items[i].patient_id,
             "score": float(score), "baseline_score": float(base)}
            for i, score, base in zip(split.test, test_scores, baseline_scores, strict=False)
        ],
    }

