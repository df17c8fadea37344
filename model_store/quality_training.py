"""Trains and measures the quality-check model of :mod:`ingest.quality` on the shared data, reproducibly.

Positives are the labelled chest radiographs (``cxr/``, ``cxr-extra/``) and the chest DICOMs;
negatives are the non-chest DICOMs and synthetic images. Orientation learns from every chest
image in 16 variants (as stored or inverted, mirrored or not, four quarter turns), polarity
from the upright ones (the service scores polarity after turning the image upright); the
frontal-chest scorer learns upright, bones-bright chests (mirrored and slightly moved)
against every variant of the negatives. Patients (NEMA series for the DICOMs) are split before
anything is generated, so no patient is on both sides. Same data, seed and library versions:
same model (``tests/test_model_store_quality.py`` rebuilds it and compares).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from covid_cxr.constants import IMAGE_SIZE
from covid_cxr.errors import DatasetError
from covid_cxr.reasons import Reason
from ingest.quality import (
    Perceptron,
    QualityModel,
    QualityPolicy,
    QualityRejected,
    assess_image,
    check_frontal_chest,
    check_orientation,
    check_polarity,
    features_of_small,
    invert_content,
    quality_features,
    small_image,
    turn_upright,
)

log = logging.getLogger(__name__)

#: Names the behaviour of the model this module builds: bump it with any change to data, features or training.
QUALITY_MODEL_VERSION = "cxr-qc-1"
SEED = 20261130
TEST_FRACTION = 0.2
HIDDEN_UNITS = 32
#: (fires, confident) on each scorer's probability of its finding.
THRESHOLDS: dict[str, tuple[float, float]] = {"polarity": (0.5, 0.95), "orientation": (0.5, 0.9),
                                              "frontal_chest": (0.5, 0.9)}
#: The chest radiographs among the shared DICOMs (``dicom/manifest.csv`` names every file; the rest are not chests).
CHEST_DICOMS = frozenset({
    "pydicom-data__RG1_J2KI.dcm", "pylibjpeg-data__RG1_JLSN.dcm", "pylibjpeg-data__966_fixed.dcm",
    "dwv__gdcm-CR-MONO1-10-chest.dcm", "orthanc-tests__Monochrome1-Jpeg.dcm",
    "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
})
#: Extra, slightly moved copies of each chest image for the polarity and orientation scorers.
VARIANT_COPIES = 1
#: Extra copies of each frontal-chest training image: positives slightly, negatives strongly moved.
CHEST_COPIES = 2
OTHER_COPIES = 3
SYNTHETIC_PER_SOURCE = 2
_NEMA_SERIES = re.compile(r"(RG\d)_")


@dataclass(frozen=True)
class Source:
    """One real image normalized to 224x224: whether it is a chest radiograph, and its patient group."""

    name: str
    image: np.ndarray
    shape: tuple[int, int]
    group: str
    chest: bool


def load_sources(data_dir: Path) -> list[Source]:
    """The shared data's images: ``cxr/`` and ``cxr-extra/`` (via their metadata.csv) and ``dicom/`` (manifest.csv).

    Raises :class:`DatasetError` when ``data_dir`` lacks ``cxr/metadata.csv`` or ``dicom/manifest.csv``.
    """
    import pydicom

    from ingest.pixels import load_image_file, normalize_grayscale, normalize_radiograph

    sources: list[Source] = []
    for folder in ("cxr", "cxr-extra"):
        table = data_dir / folder / "metadata.csv"
        if not table.is_file():
            if folder == "cxr":
                raise DatasetError(f"{table} is missing: --data must be the shared data folder",
                                   reason=Reason.DATASET_NOT_FOUND)
            continue
        with open(table, newline="") as handle:
            for row in csv.DictReader(handle):
                pixels = load_image_file(data_dir / folder / row["file"])
                sources.append(Source(f"{folder}/{row['file']}", normalize_grayscale(pixels), pixels.shape[:2],
                                      f"{folder}:{row['patient_id']}", True))
    manifest = data_dir / "dicom" / "manifest.csv"
    if not manifest.is_file():
        raise DatasetError(f"{manifest} is missing: --data must be the shared data folder",
                           reason=Reason.DATASET_NOT_FOUND)
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            ds = pydicom.dcmread(data_dir / "dicom" / row["file"])
            frames = int(ds.get("NumberOfFrames") or 1)
            image, _ = normalize_radiograph(ds, frame=0 if frames > 1 else None)
            series = _NEMA_SERIES.search(row["file"])
            sources.append(Source(f"dicom/{row['file']}", image, (int(ds.Rows), int(ds.Columns)),
                                  f"dicom:{series.group(1) if series else row['file']}", row["file"] in CHEST_DICOMS))
    return sources


def split_sources(sources: Sequence[Source], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and held-out sources, split by group (patient), chests and others apart."""
    from sklearn.model_selection import GroupShuffleSplit

    train: list[int] = []
    test: list[int] = []
    for chest in (True, False):
        members = [i for i, source in enumerate(sources) if source.chest == chest]
        groups = [sources[i].group for i in members]
        if len(set(groups)) < 2:
            train += members
            continue
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        fit, held = next(splitter.split(members, groups=groups))
        train += [members[i] for i in fit]
        test += [members[i] for i in held]
    return sorted(train), sorted(test)


# --- the variants ---------------------------------------------------------------------------------


def variant_smalls(source: Source) -> Iterator[tuple[np.ndarray, bool, int]]:
    """The 16 variants of a source as small images: (small, inverted, quarter turns of the head from the top).

    Flipping upside down puts the head at the bottom (two quarter turns) and mirrors the image;
    the small copy is a 14x14 area average, so turning and flipping it equals doing so first.
    """
    for inverted in (False, True):
        base = small_image(invert_content(source.image, source.shape) if inverted else source.image)
        for flipped in (False, True):
            oriented = base[::-1] if flipped else base
            for turns in range(4):
                yield np.rot90(oriented, turns), inverted, (turns + 2 * flipped) % 4


def _moved(image: np.ndarray, rng: np.random.Generator, *, strong: bool) -> np.ndarray:
    """A rotated, scaled, shifted and gamma-changed copy (slightly for positives, strongly for negatives)."""
    angle = rng.uniform(-30, 30) if strong else rng.uniform(-8, 8)
    scale = rng.uniform(0.6, 1.5) if strong else rng.uniform(0.9, 1.1)
    matrix = np.asarray(cv2.getRotationMatrix2D((IMAGE_SIZE / 2, IMAGE_SIZE / 2), angle, scale), dtype=np.float64)
    matrix[:, 2] += rng.uniform(-30, 30, 2) if strong else rng.uniform(-10, 10, 2)
    moved = cv2.warpAffine(image, matrix, (IMAGE_SIZE, IMAGE_SIZE), flags=cv2.INTER_LINEAR, borderValue=0)
    gamma = rng.uniform(0.6, 1.6) if strong else rng.uniform(0.7, 1.4)
    return np.asarray(np.rint(255.0 * (moved / 255.0) ** gamma), dtype=np.uint8)


def synthetic_negatives(chests: Sequence[Source], count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Images that are no radiograph at all, or only a small part of one, six kinds in turn.

    Uniform grey, noise, a smooth random field, a gradient, blurred rectangles, and a square
    window of a quarter to two fifths of a chest image enlarged to full size.
    """
    images: list[np.ndarray] = []
    for index in range(count):
        kind = index % 6
        image: np.ndarray
        if kind == 0:
            image = np.full((IMAGE_SIZE, IMAGE_SIZE), rng.integers(0, 256), dtype=np.uint8)
        elif kind == 1:
            image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8)
        elif kind == 2:
            side = int(rng.integers(2, 8))
            field = cv2.resize(rng.random((side, side)).astype(np.float32), (IMAGE_SIZE, IMAGE_SIZE),
                               interpolation=cv2.INTER_CUBIC)
            image = (255 * (field - field.min()) / (np.ptp(field) + 1e-6)).astype(np.uint8)
        elif kind == 3:
            ramp = np.outer(np.ones(IMAGE_SIZE), np.linspace(0, 255, IMAGE_SIZE)).astype(np.uint8)
            image = np.ascontiguousarray(np.rot90(ramp, int(rng.integers(4))))
        elif kind == 4:
            image = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            for _ in range(int(rng.integers(1, 6))):
                x0, y0, x1, y1 = (int(v) for v in rng.integers(0, IMAGE_SIZE, 4))
                cv2.rectangle(image, (x0, y0), (x1, y1), int(rng.integers(40, 256)), -1)
            image = cv2.GaussianBlur(image, (0, 0), rng.uniform(1, 8))
        else:
            chest = chests[int(rng.integers(len(chests)))].image
            side = int(rng.integers(IMAGE_SIZE // 4, IMAGE_SIZE * 2 // 5))
            x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - side, 2))
            image = cv2.resize(chest[y:y + side, x:x + side], (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
        images.append(image)
    return images


def polarity_and_orientation_sets(chests: Sequence[Source],
                                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of every variant of every chest image and of VARIANT_COPIES slightly moved copies of it.

    Returns the features, whether each row is inverted, and whether its head is at the top.
    """
    copies = [Source(s.name, _moved(s.image, rng, strong=False), s.shape, s.group, True)
              for _ in range(VARIANT_COPIES) for s in chests]
    rows, inverted, upright = [], [], []
    for source in [*chests, *copies]:
        for small, negative, turns in variant_smalls(source):
            rows.append(features_of_small(small))
            inverted.append(negative)
            upright.append(turns == 0)
    return np.array(rows), np.array(inverted, dtype=int), np.array(upright, dtype=int)


def frontal_chest_set(chests: Sequence[Source], others: Sequence[Source],
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels (1: not a frontal chest radiograph) for the frontal-chest scorer."""
    rows: list[np.ndarray] = []
    labels: list[int] = []
    for source in chests:
        for copy in range(1 + CHEST_COPIES):
            image = source.image if copy == 0 else _moved(source.image, rng, strong=False)
            for shown in (image, np.ascontiguousarray(image[:, ::-1])):
                rows.append(quality_features(shown))
                labels.append(0)
    for source in others:
        for copy in range(1 + OTHER_COPIES):
            moved = source if copy == 0 else Source(source.name, _moved(source.image, rng, strong=True),
                                                    (IMAGE_SIZE, IMAGE_SIZE), source.group, False)
            for small, _, _ in variant_smalls(moved):
                rows.append(features_of_small(small))
                labels.append(1)
    for image in synthetic_negatives(chests, SYNTHETIC_PER_SOURCE * len(chests), rng):
        rows.append(quality_features(image))
        labels.append(1)
    return np.array(rows), np.array(labels, dtype=int)


# --- training -------------------------------------------------------------------------------------


def fit_perceptron(features: np.ndarray, labels: np.ndarray, seed: int) -> Perceptron:
    """scikit-learn's ``MLPClassifier`` (one hidden layer of HIDDEN_UNITS ReLUs), exported as numpy arrays.

    L-BFGS on the whole set: deterministic, and on a few thousand rows faster than minibatches.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    classifier = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), solver="lbfgs", alpha=1e-2, tol=1e-6,
                               max_iter=200, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the held-out figures say whether it learned enough
        classifier.fit(features, labels)
    (hidden_weights, output_weights), (hidden_bias, output_bias) = classifier.coefs_, classifier.intercepts_
    return Perceptron(*(np.asarray(a, dtype=np.float32) for a in (hidden_weights, hidden_bias, output_weights,
                                                                  output_bias)))


def train_quality_model(sources: Sequence[Source], *, seed: int = SEED,
                        test_fraction: float = TEST_FRACTION) -> QualityModel:
    """Train the three scorers on the training patients; the held-out patients' figures go into the metadata."""
    import sklearn

    train, test = split_sources(sources, test_fraction, seed)
    chests = [sources[i] for i in train if sources[i].chest]
    others = [sources[i] for i in train if not sources[i].chest]
    if not chests or not others:
        raise DatasetError("training needs chest radiographs and other images", reason=Reason.ONE_CLASS_ONLY)
    rng = np.random.default_rng(seed)
    features, inverted, upright = polarity_and_orientation_sets(chests, rng)
    polarity = fit_perceptron(features[upright == 1], inverted[upright == 1], seed)
    upright_scorer = fit_perceptron(features, upright, seed)
    frontal_features, not_chest = frontal_chest_set(chests, others, rng)
    frontal = fit_perceptron(frontal_features, not_chest, seed)
    metadata: dict[str, Any] = {
        "version": QUALITY_MODEL_VERSION,
        "seed": seed,
        "test_fraction": test_fraction,
        "scikit_learn": sklearn.__version__,
        "scorer": f"MLPClassifier(hidden_layer_sizes=({HIDDEN_UNITS},), solver='lbfgs', alpha=0.01)",
        "training": {"chest_images": len(chests), "other_images": len(others),
                     "polarity_orientation_rows": int(len(features)), "frontal_chest_rows": int(len(not_chest))},
        "held_out": [sources[i].name for i in test],
    }
    model = QualityModel(polarity, upright_scorer, frontal, dict(THRESHOLDS), metadata)
    metadata["held_out_metrics"] = measure(model, [sources[i] for i in test], np.random.default_rng(seed + 1))
    return model


# --- measuring ------------------------------------------------------------------------------------


def measure(model: QualityModel, sources: Sequence[Source], rng: np.random.Generator) -> dict[str, Any]:
    """How often each check is right on ``sources`` and their variants.

    Polarity and orientation: every chest image in its 16 variants (the finding must be the
    variant's: the head's quarter turns, then ``inverted`` or not of the image turned as the
    orientation check says, as :func:`~ingest.quality.assess_image` does). Frontal chest: every chest
    image as stored must pass; every other image, in its 16 variants, must fire; synthetic
    negatives (as many as chest images) must fire. ``confident_errors`` count wrong findings
    the policy would have acted on.
    """
    chests = [source for source in sources if source.chest]
    others = [source for source in sources if not source.chest]
    polarity = _Tally()
    orientation = _Tally()
    for source in chests:
        for inverted in (False, True):
            image = invert_content(source.image, source.shape) if inverted else source.image
            for flipped in (False, True):
                oriented = np.ascontiguousarray(image[::-1]) if flipped else image
                for turns in range(4):
                    variant = np.ascontiguousarray(np.rot90(oriented, turns))
                    head = (turns + 2 * flipped) % 4
                    turned = check_orientation(variant, model)
                    right = turned.quarter_turns == head
                    orientation.add(right, turned.fired and turned.confident and not right)
                    upright = turn_upright(variant, turned.quarter_turns) if turned.fired else variant
                    found = check_polarity(upright, model)
                    polarity.add(found.fired == inverted, found.confident and found.fired != inverted)
    chest_passes = [not check_frontal_chest([source.image], model).fired for source in chests]
    other_fires = [_frontal_fires(model, source) for source in others]
    synthetic = synthetic_negatives(chests or list(sources), len(chests), rng) if chests else []
    synthetic_fires = [check_frontal_chest([image], model).fired for image in synthetic]
    return {
        "polarity": polarity.summary(),
        "orientation": orientation.summary(),
        "frontal_chest": {
            "chest_images_passed": _fraction(chest_passes),
            "other_images_fired": _fraction([fired for fires in other_fires for fired in fires]),
            "other_images_fired_as_stored": _fraction([fires[0] for fires in other_fires]),
            "synthetic_fired": _fraction(synthetic_fires),
            "missed_chests": [s.name for s, ok in zip(chests, chest_passes, strict=True) if not ok],
            "missed_others": [s.name for s, fires in zip(others, other_fires, strict=True) if not fires[0]],
        },
    }


def _turned(shape: tuple[int, int], turns: int) -> tuple[int, int]:
    return shape if turns % 2 == 0 else (shape[1], shape[0])


def _frontal_fires(model: QualityModel, source: Source) -> list[bool]:
    """Whether :func:`assess_image` would fire the frontal-chest check on each variant (as stored first)."""
    fires = []
    for inverted in (False, True):
        image = invert_content(source.image, source.shape) if inverted else source.image
        for flipped in (False, True):
            oriented = np.ascontiguousarray(image[::-1]) if flipped else image
            for turns in range(4):
                variant = np.ascontiguousarray(np.rot90(oriented, turns))
                checks = _flag_only_checks(variant, _turned(source.shape, turns), model)
                fires.append(checks[-1]["finding"] is not None)
    return fires


def _flag_only_checks(image: np.ndarray, shape: tuple[int, int], model: QualityModel) -> list[dict[str, Any]]:
    """The checks' outcomes under a flag-only policy (nothing is rejected or changed)."""
    policy = QualityPolicy(polarity="flag", orientation="flag", frontal_chest="flag")
    return [check.to_dict() for check in assess_image(image, shape, policy, model).checks]


class _Tally:
    def __init__(self) -> None:
        self.right = 0
        self.total = 0
        self.confident_errors = 0

    def add(self, right: bool, confident_error: bool) -> None:
        self.total += 1
        self.right += int(right)
        self.confident_errors += int(confident_error)

    def summary(self) -> dict[str, Any]:
        return {"accuracy": round(self.right / self.total, 4) if self.total else None, "n": self.total,
                "errors": self.total - self.right, "confident_errors": self.confident_errors}


def _fraction(values: Sequence[bool]) -> dict[str, Any]:
    return {"fraction": round(sum(values) / len(values), 4) if values else None, "n": len(values)}


def time_checks(model: QualityModel, images: Sequence[np.ndarray], repeats: int = 3) -> float:
    """Milliseconds of :func:`assess_image` per image (CPU time, best of ``repeats`` passes)."""
    policy = QualityPolicy()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for image in images:
            with contextlib.suppress(QualityRejected):  # a rejection costs the same; only the time counts
                assess_image(image, None, policy, model)
        best = min(best, time.process_time() - started)
    return 1000.0 * best / max(len(images), 1)

