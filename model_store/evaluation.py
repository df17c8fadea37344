"""Offline evaluation: score a stored model on a labelled set through the serving path, beside the shortcut baseline."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covid_cxr.constants import POSITIVE_CLASS
from covid_cxr.errors import DatasetError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from model_store import baseline
from model_store.architecture import to_model_input
from model_store.calibration import apply_calibration, calibration_summary
from model_store.dataset import (
    Dataset,
    describe_source,
    group_attributes,
    indices_of_patients,
    load_images_with_headers,
    manifest,
)
from model_store.metrics import binary_report
from model_store.report import compare_with_baseline, write_report
from model_store.subgroups import subgroup_metrics, with_header_attributes

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

PARTS = ("all", "train", "validation", "test")
#: Folds of the patient-level cross-validation that scores the baseline when there is no training part.
BASELINE_FOLDS = 5


def predict_scores(model: keras.Model, images: np.ndarray, batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """P(covid) per ``(224, 224)`` uint8 image, exactly as a worker computes it (:func:`to_model_input`, then the
    model)."""
    from tqdm import tqdm

    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch", disable=not progress):
        batch = to_model_input(images[start:start + batch_size])
        scores.append(np.asarray(model(batch, training=False))[:, 0])
    return np.concatenate(scores) if scores else np.zeros(0)


def evaluate(model: keras.Model, metadata: dict[str, Any], dataset: Dataset, out_dir: Path, *, part: str = "all",
             threshold: float | None = None, settings: Settings | None = None, seed: int = 0,
             progress: bool = True, group_by: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Score ``model`` on ``dataset`` (or on one recorded part of its training split) and write the report.

    ``part="all"`` scores every image; the baseline is then scored by a patient-level 5-fold
    cross-validation inside the set. ``part="test"`` (or ``train``/``validation``) keeps only the patients the
    model's metadata lists for that part, and fits the baseline on the images of the model's training and
    validation patients, which reproduces the training run's report. Scores are rescaled by the model's stored
    calibration (as the workers do). Subgroup tables: one per ``group_by`` CSV column, and one per DICOM header
    fact of :data:`~model_store.subgroups.HEADER_ATTRIBUTES` that any evaluated DICOM file has (read with the
    image; images without it, PNG/JPEG included, form the missing group). A CSV column wins over a header fact of
    the same name.
    """
    from ingest.pixels import PREPROCESSING_VERSION

    if part not in PARTS:
        raise DatasetError(f"unknown part {part!r}: choose one of {', '.join(PARTS)}", reason=Reason.BAD_SPLIT)
    threshold = float(metadata.get("decision_threshold", 0.5) if threshold is None else threshold)
    recorded = (metadata.get("data") or {}).get("split") or {}
    notes: list[str] = []
    data_manifest = manifest(dataset)
    trained_on = (metadata.get("data") or {}).get("sha256")
    if part != "all":
        if part not in recorded:
            raise DatasetError(f"the model's metadata records no {part!r} part", reason=Reason.BAD_SPLIT)
        selected = indices_of_patients(dataset, recorded[part]["patient_ids"])
        if not len(selected):
            raise DatasetError(f"none of this dataset's patients are in the model's {part} part: is it the "
                               "dataset the model was trained on (same CSV, same patient ids)?",
                               reason=Reason.BAD_SPLIT)
        fit_patients = set(recorded.get("train", {}).get("patient_ids", [])) | set(
            recorded.get("validation", {}).get("patient_ids", []))
        fit_indices = indices_of_patients(dataset, fit_patients)
        if trained_on and data_manifest["sha256"] != trained_on:
            notes.append("this dataset's manifest hash differs from the one the model was trained on")
    else:
        selected = np.arange(len(dataset.items))
        fit_indices = np.array([], dtype=int)
        seen = {patient for name in ("train", "validation")
                for patient in recorded.get(name, {}).get("patient_ids", [])}
        overlap = sum(1 for item in dataset.items if item.patient_id in seen)
        if overlap:
            notes.append(f"{overlap} of the {len(dataset.items)} images belong to patients the model was trained or "
                         "validated on: these figures are optimistic")
    if metadata.get("preprocessing_version") not in (None, PREPROCESSING_VERSION):
        notes.append(f"model trained with preprocessing {metadata['preprocessing_version']}, "
                     f"images here use {PREPROCESSING_VERSION}: train/serve skew")

    evaluated = dataset.subset(selected)
    from_csv = group_attributes(evaluated, group_by)  # an unknown --group-by column fails before decoding
    loaded = load_images_with_headers(dataset.subset(np.concatenate([selected, fit_indices])), settings, progress)
    images = loaded.images
    eval_images, fit_images = images[: len(selected)], images[len(selected):]
    groups = with_header_attributes(from_csv, loaded.headers[: len(selected)], notes)
    calibration = metadata.get("calibration") or {"method": "none"}
    scores = apply_calibration(predict_scores(model, eval_images, progress=progress), calibration)
    labels = evaluated.labels
    model_metrics = binary_report(labels, scores, threshold=threshold, seed=seed)
    evaluation: dict[str, Any] = {
        "title": f"{part} images" if part == "all" else f"the model's recorded {part} part",
        "data_description": f"{describe_source(dataset.source)}; {len(evaluated.items)} images of "
                            f"{len(set(evaluated.groups))} patients",
        "part": part,
        "data": {key: data_manifest[key] for key in ("source", "n_images", "n_patients", "counts", "sha256")},
        "model": {key: metadata.get(key) for key in ("name", "version", "sha256")},
        "metrics": model_metrics,
        "notes": notes,
        "calibration": calibration_summary(labels == POSITIVE_CLASS, scores, calibration),
        "operating_point": metadata.get("operating_point") or {"rule": "fixed", "threshold": threshold},
        "subgroups": subgroup_metrics(labels, scores, groups, model_metrics, threshold=threshold, seed=seed),
    }
    if threshold != float(evaluation["operating_point"]["threshold"]):
        evaluation["operating_point"] = {"rule": "fixed", "threshold": threshold, "chosen_on": "given",
                                         "note": "--threshold given instead of the model's stored operating point"}
    if metadata.get("degenerate"):
        evaluation["degenerate"] = metadata["degenerate"]
    baseline_scores = _baseline_scores(evaluated, eval_images, dataset.subset(fit_indices), fit_images, seed)
    if baseline_scores is not None:
        scores_for_baseline, fitted_on = baseline_scores
        baseline_metrics = binary_report(labels, scores_for_baseline, threshold=0.5, seed=seed)
        evaluation["baseline"] = {"method": baseline.METHOD, "fitted_on": fitted_on, "metrics": baseline_metrics,
                                  "comparison": compare_with_baseline(model_metrics, baseline_metrics)}
    else:
        scores_for_baseline = np.full(len(scores), np.nan)
        evaluation["baseline_note"] = (f"not run: needs at least 2 patients per class "
                                       f"({BASELINE_FOLDS}-fold patient-level cross-validation)")
    evaluation["predictions"] = [
        {"key": item.key, "label": item.label, "patient_id": item.patient_id, "score": float(score),
         "baseline_score": None if np.isnan(base) else float(base)}
        for item, score, base in zip(evaluated.items, scores, scores_for_baseline, strict=False)
    ]
    files = write_report(evaluation, out_dir)
    return evaluation, files


def _baseline_scores(evaluated: Dataset, eval_images: np.ndarray, fit_set: Dataset, fit_images: np.ndarray,
                     seed: int) -> tuple[np.ndarray, str] | None:
    if fit_set.items and min(fit_set.counts().values()) > 0:
        scores = baseline.fit_and_score(fit_images, fit_set.labels == POSITIVE_CLASS, eval_images, seed)
        return scores, f"the model's training + validation patients ({len(fit_set.items)} images)"
    groups_per_class = [len({item.patient_id for item in evaluated.items if item.label == name})
                        for name in evaluated.classes]
    folds = min(BASELINE_FOLDS, *groups_per_class)
    if folds < 2:
        return None
    scores = baseline.cross_validated_scores(eval_images, evaluated.labels == POSITIVE_CLASS, evaluated.groups,
                                             folds, seed)
    if np.isnan(scores).any():
        return None
    return scores, f"out-of-fold scores of a {folds}-fold patient-level cross-validation inside the evaluated set"

