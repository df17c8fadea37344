"""The offline evaluation report of a labelled set, written as text, JSON and PNG plots; no TensorFlow.

Training (its test part) and ``covid-cxr models evaluate`` assemble it; :mod:`model_store.report_render`
renders it, as it renders the nightly reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from model_store.report_render import (
    RocCurve,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    plot_training_curves,
    render_dataset_text,
)

SHORTCUT_RULE = ("the model beats the shortcut baseline when its accuracy is higher AND its ROC AUC is higher "
                 "(point estimates; overlapping intervals mean the difference is not established)")


def compare_with_baseline(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Whether the model beats the thumbnail baseline (see :data:`SHORTCUT_RULE`), with the differences."""
    accuracy, base_accuracy = model["accuracy"]["value"], baseline["accuracy"]["value"]
    auc, base_auc = model["roc_auc"]["value"], baseline["roc_auc"]["value"]
    beats_accuracy = accuracy is not None and base_accuracy is not None and accuracy > base_accuracy
    beats_auc = auc is not None and base_auc is not None and auc > base_auc
    beats = beats_accuracy and beats_auc
    return {
        "rule": SHORTCUT_RULE,
        "beats_baseline": beats,
        "accuracy_difference": None if accuracy is None or base_accuracy is None else accuracy - base_accuracy,
        "auc_difference": None if auc is None or base_auc is None else auc - base_auc,
        "flag": None if beats else "DOES NOT BEAT the 32x32 thumbnail baseline: its accuracy may rest on shortcuts",
    }


def write_report(evaluation: dict[str, Any], out_dir: Path, history: dict[str, list[float]] | None = None,
                 prefix: str = "") -> dict[str, str]:
    """Write ``report.txt``, ``report.json``, ``confusion_matrix.png``, ``roc_curve.png`` (and ``training_curves.png``).

    ``evaluation`` needs ``title``, ``data_description``, ``metrics`` (a :func:`model_store.metrics.binary_report`),
    ``predictions`` (``label``, ``score`` and optionally ``baseline_score`` per image) and optionally
    ``baseline`` and ``model``. Returns the written paths by kind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "text": out_dir / f"{prefix}report.txt",
        "json": out_dir / f"{prefix}report.json",
        "confusion_matrix": out_dir / f"{prefix}confusion_matrix.png",
        "roc_curve": out_dir / f"{prefix}roc_curve.png",
    }
    paths["text"].write_text(render_dataset_text(evaluation))
    plot_confusion_matrix(evaluation["metrics"], paths["confusion_matrix"], evaluation["title"])
    plot_roc(evaluation["metrics"], [row["label"] for row in evaluation["predictions"]], _roc_curves(evaluation),
             paths["roc_curve"])
    if evaluation.get("calibration"):
        paths["reliability"] = out_dir / f"{prefix}reliability.png"
        plot_reliability(evaluation["calibration"], paths["reliability"])
    if history:
        paths["training_curves"] = out_dir / f"{prefix}training_curves.png"
        plot_training_curves(history, paths["training_curves"])
    written = {kind: str(path) for kind, path in paths.items()}
    paths["json"].write_text(json.dumps({**evaluation, "files": written}, indent=2, default=_plain) + "\n")
    return written


def _roc_curves(evaluation: dict[str, Any]) -> list[RocCurve]:
    """The model's curve, and the thumbnail baseline's when the evaluation has one."""
    predictions = evaluation["predictions"]
    curves = [RocCurve("model", [row["score"] for row in predictions], evaluation["metrics"]["roc_auc"])]
    if evaluation.get("baseline"):
        curves.append(RocCurve("32x32 baseline", [row["baseline_score"] for row in predictions],
                               evaluation["baseline"]["metrics"]["roc_auc"]))
    return curves


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
