"""``covid-cxr qc train`` and ``covid-cxr qc measure``: rebuild and measure the quality-check model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from covid_cxr.commandline import Subparsers


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add ``qc``; `common` is the parent parser with the installation flags (unused: nothing here is installed)."""
    from ingest.quality import QUALITY_MODEL_FILE
    from model_store.quality_training import SEED, TEST_FRACTION

    qc = subparsers.add_parser("qc", help="the quality-check model (polarity, orientation, frontal chest)")
    actions = qc.add_subparsers(dest="qc_command", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train", help="train it on the shared data and write it",
        description="Rebuild the quality-check model from the shared data folder (cxr/, cxr-extra/, dicom/): "
                    "split by patient, train the three scorers on the training patients, measure them on the "
                    "held-out ones (stored in the model's metadata and printed). The same data, seed and "
                    "library versions give the same model.")
    train.add_argument("--data", type=Path, required=True, metavar="DIR", help="the shared data folder")
    train.add_argument("--out", type=Path, default=QUALITY_MODEL_FILE,
                       help=f"where to write the .npz (default: the shipped model, {QUALITY_MODEL_FILE.name})")
    train.add_argument("--seed", type=int, default=SEED, help=f"split, copies and initialisation (default {SEED})")
    train.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                       help=f"patients held out for the figures (default {TEST_FRACTION})")
    train.add_argument("--json", action="store_true", help="print the model's metadata as JSON")
    train.set_defaults(func=_train)

    measure = actions.add_parser(
        "measure", help="measure a model on the whole shared data and time it",
        description="How often each check is right on every image of the shared data folder and its variants "
                    "(training images included: the held-out figures are in the model's metadata), and the "
                    "CPU milliseconds per image of the three checks.")
    measure.add_argument("--data", type=Path, required=True, metavar="DIR", help="the shared data folder")
    measure.add_argument("--model", type=Path, default=QUALITY_MODEL_FILE, help="the .npz (default: the shipped one)")
    measure.add_argument("--json", action="store_true", help="print the figures as JSON")
    measure.set_defaults(func=_measure)


def _train(args: argparse.Namespace) -> int:
    from model_store.quality_training import load_sources, train_quality_model

    model = train_quality_model(load_sources(args.data), seed=args.seed, test_fraction=args.test_fraction)
    model.save(args.out)
    metadata = model.metadata
    if args.json:
        print(json.dumps(metadata, indent=2))
    else:
        print(f"{metadata['version']}: {args.out}")
        print(_figures("held-out patients", metadata["held_out_metrics"]))
    return 0


def _measure(args: argparse.Namespace) -> int:
    import numpy as np

    from ingest.quality import QualityModel
    from model_store.quality_training import load_sources, measure, time_checks

    model = QualityModel.load(args.model)
    sources = load_sources(args.data)
    figures = measure(model, sources, np.random.default_rng(model.metadata.get("seed", 0)))
    figures["ms_per_image"] = round(time_checks(model, [source.image for source in sources]), 3)
    if args.json:
        print(json.dumps({"version": model.version, **figures}, indent=2))
    else:
        print(f"{model.version} on all of {args.data} ({len(sources)} images; training images included)")
        print(_figures("all images", figures))
        print(f"  {figures['ms_per_image']} ms per image (CPU, the three checks)")
    return 0


def _figures(title: str, figures: dict[str, Any]) -> str:
    frontal = figures["frontal_chest"]
    lines = [f"{title}:"]
    for check in ("polarity", "orientation"):
        tally = figures[check]
        lines.append(f"  {check}: {tally['accuracy']:.2%} right of {tally['n']} variants "
                     f"({tally['errors']} wrong, {tally['confident_errors']} confidently)")
    lines.append(f"  frontal chest: {_share(frontal['chest_images_passed'])} chest images pass, "
                 f"{_share(frontal['other_images_fired_as_stored'])} other images fire as stored "
                 f"({_share(frontal['other_images_fired'])} of their variants), "
                 f"{_share(frontal['synthetic_fired'])} synthetic negatives fire")
    for name in (*frontal["missed_chests"], *frontal["missed_others"]):
        lines.append(f"    missed: {name}")
    return "\n".join(lines)


def _share(fraction: dict[str, Any]) -> str:
    return "-" if fraction["fraction"] is None else f"{fraction['fraction']:.1%} of {fraction['n']}"
