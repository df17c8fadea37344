"""Head recipes compared on one set of cached prefix outputs (patient-level split); one JSON line per recipe.

Usage: recipe_search.py CACHE_DIR OUT.jsonl CSV [CSV ...]   (rows label=covid,normal; base weights none)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from covid_cxr.constants import CLASS_NAMES, POSITIVE_CLASS
from model_store.architecture import split_point
from model_store.dataset import from_csvs, load_images, split_dataset
from model_store.features import split_model
from model_store.training import (
    TrainingConfig,
    build_seeded_model,
    cached_features,
    features_cache_key,
    fit_suffix,
    positive_scores,
)

RECIPES = {
    "lr1e-4_balanced_stop-balacc": {"learning_rate": 1e-4, "early_stopping_metric": "val_balanced_accuracy"},
    "origin_lr1e-3_balanced_stop-valloss": {"early_stopping_metric": "val_loss"},
    "lr1e-3_balanced_stop-balacc": {"early_stopping_metric": "val_balanced_accuracy"},
    "lr3e-5_balanced_stop-balacc": {"learning_rate": 3e-5, "early_stopping_metric": "val_balanced_accuracy"},
    "lr1e-4_unweighted_stop-balacc": {"learning_rate": 1e-4, "class_weight": "none",
                                      "early_stopping_metric": "val_balanced_accuracy"},
}


def summary(labels: np.ndarray, scores: np.ndarray) -> dict[str, float | int]:
    predicted = np.where(scores >= 0.5, POSITIVE_CLASS, CLASS_NAMES[1])
    positive = labels == POSITIVE_CLASS
    return {"n": len(labels), "balanced_accuracy": round(float(balanced_accuracy_score(labels, predicted)), 3),
            "auc": round(float(roc_auc_score(positive, scores)), 3),
            "predicted_positive": int((predicted == POSITIVE_CLASS).sum())}


def main(cache_dir: Path, out: Path, csvs: list[Path]) -> None:
    dataset = from_csvs(csvs, CLASS_NAMES, where={"label": frozenset(CLASS_NAMES)})
    base = TrainingConfig(learning_rate=1e-3)
    trainable_from = base.resolved_trainable_from()
    split = split_dataset(dataset, base.test_fraction, base.validation_fraction, base.seed)
    images = load_images(dataset, progress=False)
    cut = split_point(trainable_from)
    prefix, _ = split_model(build_seeded_model(base, trainable_from), cut)
    features = cached_features(prefix, cut, images, split, base, True, cache_dir,
                               features_cache_key(dataset, split, cut, base))
    labels = dataset.labels
    for name, changes in RECIPES.items():
        config = replace(base, **changes)  # type: ignore[arg-type]
        clock = time.perf_counter()
        _, suffix = split_model(build_seeded_model(config, trainable_from), cut)
        fit = fit_suffix(suffix, features, labels, split, config, progress=False)
        row = {"recipe": name, "changes": changes, "epochs_run": len(fit.curves["loss"]), "best_epoch": fit.best_epoch,
               "validation": summary(labels[split.validation], positive_scores(suffix, features.validation)),
               "test": summary(labels[split.test], positive_scores(suffix, features.test)),
               "fit_s": round(time.perf_counter() - clock)}
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(arg) for arg in sys.argv[3:]])
