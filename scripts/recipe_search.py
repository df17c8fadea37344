"""Head recipes compared on the same data, split and prefix outputs, over several seeds; one JSON line per run.

Two steps, so that the comparison can run where the files are not (a GPU machine):

    python scripts/recipe_search.py prepare DATA.npz CSV [CSV ...]   # rows label=covid,normal, read as training does
    python scripts/recipe_search.py run DATA.npz OUT.jsonl [--seeds 42,1,2] [--recipes NAME,...]

``prepare`` stores the normalized 224 x 224 images, labels, pseudonymized patient groups (sha256) and the
``origin_dataset`` column; nothing else of the CSV rows. ``run`` makes, per seed, the patient-level split and the
seeded block-4 prefix outputs once (base weights none, the training defaults otherwise), fits every recipe's block 5
+ head on them, and reports the validation and test parts at threshold 0.5 on raw scores, with the test AUC's
bootstrap interval, the adult-only test AUC (every origin but the pediatric Kermany set) and the degenerate check.
Any Keras backend runs it (``KERAS_BACKEND=jax`` on a machine without TensorFlow).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covid_cxr.constants import CLASS_NAMES  # noqa: E402
from model_store.metrics import binary_report, degeneracy  # noqa: E402

RECIPES: dict[str, dict[str, Any]] = {
    "origin_lr1e-3_balanced_stop-valloss": {"early_stopping_metric": "val_loss"},
    "lr1e-3_balanced_stop-balacc": {"early_stopping_metric": "val_balanced_accuracy"},
    "lr1e-4_balanced_stop-balacc": {"learning_rate": 1e-4, "early_stopping_metric": "val_balanced_accuracy"},
    "lr3e-5_balanced_stop-valloss": {"learning_rate": 3e-5, "early_stopping_metric": "val_loss"},
    "lr1e-3_unweighted_stop-valloss": {"class_weight": "none", "early_stopping_metric": "val_loss"},
    "lr1e-3_balanced_stop-auc": {"early_stopping_metric": "val_auc"},
}
#: The only pediatric collection of the shared data (its normals are children's films).
PEDIATRIC_ORIGIN = "Kermany"


def prepare(out: Path, csvs: list[Path]) -> None:
    from model_store.dataset import from_csvs, load_images

    dataset = from_csvs(csvs, CLASS_NAMES, where={"label": frozenset(CLASS_NAMES)})
    images = load_images(dataset, progress=False)
    groups = [hashlib.sha256(item.patient_id.encode()).hexdigest()[:16] for item in dataset.items]
    origins = [item.attributes.get("origin_dataset") or "" for item in dataset.items]
    np.savez_compressed(out, images=images, labels=np.array(dataset.labels, dtype=str), groups=np.array(groups),
                        origins=np.array(origins))
    print(f"{out}: {len(images)} images, {dataset.counts()}")


def _dataset(labels: np.ndarray, groups: np.ndarray) -> Any:
    from model_store.dataset import Dataset, Item

    items = [Item(Path(f"{i}"), str(label), str(group), f"{i}") for i, (label, group) in
             enumerate(zip(labels, groups, strict=True))]
    return Dataset(items, {"kind": "npz"}, CLASS_NAMES, True)


def _part(labels: np.ndarray, scores: np.ndarray, part: str, bootstrap: int) -> dict[str, Any]:
    report = binary_report(labels, scores, threshold=0.5, bootstrap=bootstrap)
    auc = report["roc_auc"]
    return {"n": report["n"], "balanced_accuracy": round((report["sensitivity"]["value"] +
                                                          report["specificity"]["value"]) / 2, 3),
            "sensitivity": round(report["sensitivity"]["value"], 3),
            "specificity": round(report["specificity"]["value"], 3),
            "auc": None if auc["value"] is None else round(auc["value"], 3),
            "auc_interval": auc.get("ci"), "predicted_positive": report["tp"] + report["fp"],
            "degenerate": degeneracy(report, part)}


def run(data: Path, out: Path, seeds: list[int], recipes: list[str], limit: int | None = None) -> None:
    import keras

    from model_store.architecture import split_point
    from model_store.dataset import split_dataset
    from model_store.features import split_model
    from model_store.training import (
        TrainingConfig,
        build_seeded_model,
        cache_features,
        fit_suffix,
        positive_scores,
    )

    with np.load(data) as stored:
        images, labels = stored["images"], stored["labels"].astype(object)
        groups, origins = stored["groups"].astype(object), stored["origins"].astype(str)
    if limit:  # a rehearsal on the first LIMIT images of each class
        keep = np.concatenate([np.flatnonzero(labels == name)[:limit] for name in CLASS_NAMES])
        images, labels, groups, origins = images[keep], labels[keep], groups[keep], origins[keep]
    dataset = _dataset(labels, groups)
    adult = np.array([PEDIATRIC_ORIGIN not in origin for origin in origins])
    print(f"Keras {keras.__version__} on {keras.backend.backend()}; {len(images)} images", flush=True)
    for seed in seeds:
        base = TrainingConfig(seed=seed)
        trainable_from = base.resolved_trainable_from()
        split = split_dataset(dataset, base.test_fraction, base.validation_fraction, seed)
        cut = split_point(trainable_from)
        clock = time.perf_counter()
        prefix, _ = split_model(build_seeded_model(base, trainable_from), cut)
        features = cache_features(prefix, cut, images, split, base, False)
        features_s = time.perf_counter() - clock
        for name in recipes:
            config = replace(base, **RECIPES[name])
            clock = time.perf_counter()
            _, suffix = split_model(build_seeded_model(config, trainable_from), cut)
            fit = fit_suffix(suffix, features, labels, split, config, progress=False)
            test_scores = positive_scores(suffix, features.test)
            test_adult = adult[split.test]
            adult_report = binary_report(labels[split.test][test_adult], test_scores[test_adult], bootstrap=0)
            row = {"recipe": name, "seed": seed, "changes": RECIPES[name],
                   "split": {part: int(len(indices)) for part, indices in split.parts().items()},
                   "epochs_run": len(fit.curves["loss"]), "best_epoch": fit.best_epoch,
                   "validation": _part(labels[split.validation], positive_scores(suffix, features.validation),
                                       "validation", 0),
                   "test": _part(labels[split.test], test_scores, "test", 1000),
                   "test_adult_auc": adult_report["roc_auc"]["value"],
                   "test_adult_n": int(test_adult.sum()),
                   "features_s": round(features_s, 1), "fit_s": round(time.perf_counter() - clock, 1)}
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    preparing = steps.add_parser("prepare", help="read the labelled CSVs once into DATA.npz")
    preparing.add_argument("data", type=Path)
    preparing.add_argument("csvs", type=Path, nargs="+")
    running = steps.add_parser("run", help="fit every recipe on DATA.npz, per seed")
    running.add_argument("data", type=Path)
    running.add_argument("out", type=Path)
    running.add_argument("--seeds", default="42", help="comma-separated (default 42, training's default)")
    running.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    running.add_argument("--limit", type=int, help="only the first LIMIT images of each class (a quick rehearsal)")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.data, args.csvs)
    else:
        unknown = [name for name in args.recipes.split(",") if name not in RECIPES]
        if unknown:
            parser.error(f"unknown recipe(s): {', '.join(unknown)}")
        run(args.data, args.out, [int(seed) for seed in args.seeds.split(",")], args.recipes.split(","), args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
