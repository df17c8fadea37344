"""``covid-cxr train`` and ``covid-cxr models list|show|import|export|activate|evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_cxr import constants
from covid_cxr.commandline import Subparsers, settings_from_args
from covid_cxr.constants import CLASS_NAMES
from covid_cxr.errors import UsageError
from covid_cxr.reasons import Reason
from covid_cxr.safe_output import printable, printable_lines
from covid_cxr.settings import Settings

if TYPE_CHECKING:
    from model_store.dataset import Dataset


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    """Add this package's subcommands; `common` is the parent parser with the installation flags."""
    data = _data_options()

    train = subparsers.add_parser(
        "train", parents=[common, data], help="train a model on a labelled folder or CSV and write its artifact",
        description="Train the VGG16 classifier. Images go through the ingest pipeline's normalization (as in "
                    "serving); the frozen part of the base is computed once and cached. Writes model.keras, "
                    "metadata.json and the held-out test report into --out.")
    weights = train.add_argument_group("model")
    weights.add_argument("--base-weights", default="none",
                         help="none (random init), imagenet (Keras downloads it; needs internet), or the path of a "
                              "local HDF5 file laid out like Keras's vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 "
                              "(default: none)")
    weights.add_argument("--trainable-from", default=constants.TRAINABLE_FROM,
                         help="first trainable VGG16 block (block1..block5), none (frozen base, the origin), or auto: "
                              "none with pretrained weights, block5 without (default: auto)")
    weights.add_argument("--name", help="registry name (default: COVID_CXR_MODEL_NAME, else "
                                        f"{constants.MODEL_NAME})")
    fit = train.add_argument_group("training (defaults follow the origin)")
    fit.add_argument("--epochs", type=int, default=constants.EPOCHS)
    fit.add_argument("--batch-size", type=int, default=constants.TRAINING_BATCH_SIZE)
    fit.add_argument("--learning-rate", type=float, default=None,
                     help=f"Adam's rate (default: the origin's {constants.LEARNING_RATE:g} for a head on a frozen "
                          f"pretrained base, {constants.LEARNING_RATE_FINE_TUNING:g} when block 5 is trained too)")
    fit.add_argument("--test-fraction", type=float, default=constants.TEST_FRACTION,
                     help="patients held out for the test report")
    fit.add_argument("--validation-fraction", type=float, default=constants.VALIDATION_FRACTION,
                     help="of the remaining patients, held out for early stopping; 0 disables early stopping")
    fit.add_argument("--patience", type=int, default=constants.EARLY_STOPPING_PATIENCE,
                     help="early-stopping patience in epochs (val loss)")
    fit.add_argument("--no-augment", dest="augment", action="store_false", help="no rotated copies")
    fit.add_argument("--augment-copies", type=int, default=constants.AUGMENT_COPIES,
                     help=f"rotated copies (+-{constants.ROTATION_DEGREES:g} degrees) of each training image whose "
                          "features are cached; each epoch draws one version of every image "
                          f"(default: {constants.AUGMENT_COPIES})")
    fit.add_argument("--class-weight", choices=constants.CLASS_WEIGHT_MODES, default=constants.CLASS_WEIGHT)
    fit.add_argument("--seed", type=int, default=constants.SEED,
                     help=f"split, augmentation and initialisation seed (default: {constants.SEED})")
    fit.add_argument("--early-stopping-metric", choices=constants.EARLY_STOPPING_METRICS,
                     default=constants.EARLY_STOPPING_METRIC,
                     help=f"what early stopping watches on the validation part (default: "
                          f"{constants.EARLY_STOPPING_METRIC})")
    trust = train.add_argument_group("operating point and calibration (fitted on the validation part)")
    point = trust.add_mutually_exclusive_group()
    point.add_argument("--threshold", type=_threshold_option, default=constants.DECISION_THRESHOLD,
                       help=f"decision threshold on P({constants.POSITIVE_CLASS}) stored with the model: a number, "
                            f"or 'youden' (chosen on the validation part); default {constants.DECISION_THRESHOLD}")
    point.add_argument("--target-sensitivity", type=float,
                       help="choose the highest threshold reaching this sensitivity on the validation part")
    trust.add_argument("--calibration", choices=constants.CALIBRATION_METHODS, default="none",
                       help="temperature or Platt scaling of the scores, fitted on the validation part")
    output = train.add_argument_group("output")
    output.add_argument("--group-by", action="append", default=[], metavar="COLUMN",
                        help="CSV column whose values get a subgroup table in the report (repeatable; 'age' is "
                             "reported as decade bands)")
    output.add_argument("--feature-cache", type=Path,
                        help="folder keeping the frozen prefix's outputs between runs on the same data and seed")
    output.add_argument("--force", action="store_true",
                        help="with --activate: activate even a degenerate model (recorded)")
    output.add_argument("--out", type=Path, help="artifact folder (default: DATA_DIR/runs/NAME-UTCTIME)")
    output.add_argument("--register", action="store_true", help="import the artifact into the registry (database)")
    output.add_argument("--activate", action="store_true", help="register and make it the active version")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    train.set_defaults(func=_train)

    explaining = subparsers.add_parser(
        "explain", parents=[common], help="Grad-CAM heatmap of the active model for one stored instance",
        description="Write a Grad-CAM heatmap (at block5_conv3) of the active model's P(covid) for the stored "
                    "normalized image of INSTANCE_ID, overlaid on the 224x224 input. One image on demand; never "
                    "part of the batch path. For a file, use `covid-cxr inspect FILE --explain OUT.png`.")
    explaining.add_argument("instance_id", type=int, metavar="INSTANCE_ID")
    explaining.add_argument("out", type=Path, metavar="OUT.png")
    explaining.set_defaults(func=_explain)

    models = subparsers.add_parser("models", help="the model registry: list, show, import, export, activate, evaluate")
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[common], help="registered versions, active ones marked")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    show = actions.add_parser("show", parents=[common], help="a version's metadata as JSON")
    show.add_argument("model", nargs="?", help="NAME[:VERSION] (default: the active COVID_CXR_MODEL_NAME)")
    show.set_defaults(func=_show)
    importing = actions.add_parser("import", parents=[common], help="register an artifact folder after verifying it")
    importing.add_argument("path", type=Path, help="artifact folder (model.keras + metadata.json) or its model.keras")
    importing.add_argument("--name", help="register under this name instead of the metadata's")
    importing.add_argument("--activate", action="store_true")
    importing.add_argument("--force", action="store_true",
                           help="with --activate: activate even a model its training flagged as degenerate (recorded)")
    importing.set_defaults(func=_import)
    exporting = actions.add_parser("export", parents=[common], help="write a version as an artifact folder")
    exporting.add_argument("model", help="NAME[:VERSION] (NAME defaults to COVID_CXR_MODEL_NAME)")
    exporting.add_argument("out", type=Path)
    exporting.set_defaults(func=_export)
    carding = actions.add_parser("card", parents=[common],
                                 help="write a version's model card (Markdown and HTML) from its metadata and reports")
    carding.add_argument("model", nargs="?", help="NAME[:VERSION] (default: the active COVID_CXR_MODEL_NAME)")
    carding.add_argument("--artifact", type=Path, help="an artifact folder (or its metadata.json) instead of a "
                         "registered version: the card of a published or not yet imported model, without a database")
    carding.add_argument("--out", type=Path, help="folder (default: REPORTS/model-card-NAME-VERSION, or the artifact "
                         "folder with --artifact)")
    carding.set_defaults(func=_card)
    activating = actions.add_parser("activate", parents=[common], help="make a version the one the workers serve")
    activating.add_argument("model", help="NAME:VERSION (NAME defaults to COVID_CXR_MODEL_NAME)")
    activating.add_argument("--force", action="store_true",
                            help="activate even a model its training flagged as degenerate (recorded)")
    activating.add_argument("--threshold", type=float,
                            help="serve with this decision threshold instead of the model's stored one (recorded)")
    activating.set_defaults(func=_activate)
    evaluating = actions.add_parser(
        "evaluate", parents=[common, data], help="score a model on a labelled set: report text, JSON and plots",
        description="Evaluate a registered model (or an artifact folder) on a labelled folder or CSV, beside the "
                    "32x32 thumbnail logistic-regression shortcut baseline.")
    which = evaluating.add_mutually_exclusive_group()
    which.add_argument("model", nargs="?",
                       help="NAME[:VERSION] from the registry (default: the active COVID_CXR_MODEL_NAME)")
    which.add_argument("--artifact", type=Path, help="an artifact folder instead of a registered model")
    evaluating.add_argument("--part", choices=("all", "train", "validation", "test"), default="all",
                            help="all images, or only the patients of one part of the model's recorded split")
    evaluating.add_argument("--threshold", type=float, help="decision threshold (default: the model's)")
    evaluating.add_argument("--group-by", action="append", default=[], metavar="COLUMN",
                            help="CSV column whose values get a subgroup table (repeatable; 'age' as decade bands); "
                                 "DICOM files get tables by manufacturer, modality, view position, institution, sex "
                                 "and age band from their headers without it")
    evaluating.add_argument("--out", type=Path, help="report folder (default: REPORTS/evaluate-VERSION-UTCTIME)")
    evaluating.add_argument("--no-progress", dest="progress", action="store_false")
    evaluating.set_defaults(func=_evaluate)


def _data_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("labelled images")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="folder with covid/ and normal/ subfolders of PNG/JPEG/DICOM")
    source.add_argument("--csv", type=Path, action="append",
                        help="CSV with a header: path (or file), label[, patient_id]; paths relative to the CSV's "
                             "folder; repeat it to combine several CSVs into one set")
    group.add_argument("--label-column", default="label", help="CSV label column (default: label)")
    group.add_argument("--path-column", help="CSV path column (default: path, else file)")
    group.add_argument("--patient-column", default="patient_id", help="CSV patient id column (default: patient_id)")
    group.add_argument("--where", action="append", default=[], metavar="COLUMN=V1[,V2]",
                       help="keep only CSV rows whose COLUMN is one of the values; repeatable (ANDed)")
    return parent


def _dataset(args: argparse.Namespace) -> Dataset:
    from model_store.dataset import from_csvs, from_folder, parse_where

    if args.folder is not None:
        if args.where:
            raise UsageError("--where filters CSV rows; it cannot be used with --folder", reason=Reason.BAD_FILTER)
        return from_folder(args.folder, CLASS_NAMES)
    return from_csvs(args.csv, CLASS_NAMES, label_column=args.label_column, path_column=args.path_column,
                    patient_column=args.patient_column, where=parse_where(args.where))


def _card(args: argparse.Namespace) -> int:
    from model_store.card import card_context, registered_card_context, write_card

    if args.artifact is not None:
        from model_store.artifact import read_metadata

        if args.model:
            raise UsageError("give a registered NAME[:VERSION] or --artifact, not both",
                             reason=Reason.BAD_MODEL_REFERENCE)
        context = card_context(read_metadata(args.artifact))
        folder = args.artifact if args.artifact.is_dir() else args.artifact.parent
        files = write_card(context, args.out or folder)
        print("written: " + ", ".join(files.values()))
        return 0
    settings = settings_from_args(args)
    context = registered_card_context(settings, *_parse_model(args.model, settings))
    out = args.out or settings.reports / f"model-card-{context['name']}-{context['version']}"
    files = write_card(context, out)
    print("written: " + ", ".join(files.values()))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from model_store.explain import explain_instance

    explained = explain_instance(settings_from_args(args), args.instance_id, args.out)
    print(f"{explained['explain']}: Grad-CAM at {explained['layer']} of {explained['model']}; "
          f"P(covid) {explained['score']:.4f}, threshold {explained['threshold']}")
    return 0


def _threshold_option(text: str) -> float | str:
    if text.strip().lower() == "youden":
        return "youden"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) or 'youden', got {text!r}") from None


def _utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def _train(args: argparse.Namespace) -> int:
    from model_store.artifact import check_identifier
    from model_store.training import TrainingConfig, train

    settings = settings_from_args(args)
    name = check_identifier(args.name or settings.model_name, "name")
    config = TrainingConfig(
        base_weights=args.base_weights, trainable_from=args.trainable_from, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, test_fraction=args.test_fraction,
        validation_fraction=args.validation_fraction, early_stopping_patience=args.patience, augment=args.augment,
        augment_copies=args.augment_copies, class_weight=args.class_weight,
        early_stopping_metric=args.early_stopping_metric, seed=args.seed,
        threshold=constants.DECISION_THRESHOLD if args.threshold == "youden" else args.threshold,
        operating_point=("sensitivity" if args.target_sensitivity is not None
                         else "youden" if args.threshold == "youden" else "fixed"),
        target_sensitivity=args.target_sensitivity, calibration=args.calibration, name=name)
    config.check()
    dataset = _dataset(args)
    out = args.out or settings.data_dir / "runs" / f"{name}-{_utc_stamp()}"
    result = train(dataset, config, out, settings=settings, progress=args.progress, feature_cache=args.feature_cache,
                   group_by=args.group_by)
    print(printable_lines(Path(result.report_files["text"]).read_text()))
    print(f"artifact: {result.artifact.directory} ({name} {result.artifact.version}, "
          f"sha256 {result.artifact.sha256})")
    if args.register or args.activate:
        from model_store.registry import activation_note, import_artifact

        forced = " --force" if args.force else ""
        record = import_artifact(settings, result.artifact.directory, activate=args.activate, force=args.force,
                                 activated_by=activation_note(f"covid-cxr train --activate{forced} (run {out.name})"))
        print(f"registered {record.name} {record.version}{' (active)' if record.active else ''}")
    return 0


def _parse_model(text: str | None, settings: Settings) -> tuple[str, str | None]:
    """``NAME[:VERSION]`` as (name, version); the name defaults to ``settings.model_name``, the version to ``None``."""
    name, _, version = (text or "").partition(":")
    return name or settings.model_name, version or None


def _parse_model_version(text: str, settings: Settings) -> tuple[str, str]:
    """``[NAME]:VERSION`` as (name, version); the name defaults to ``settings.model_name``."""
    name, version = _parse_model(text, settings)
    if version is None:
        raise UsageError(f"give NAME:VERSION (got {text!r}); `covid-cxr models list` shows them",
                         reason=Reason.BAD_MODEL_REFERENCE)
    return name, version


def _list(args: argparse.Namespace) -> int:
    from model_store.registry import list_models, summary

    rows = [summary(record) for record in list_models(settings_from_args(args))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models registered")
        return 0
    print(f"{'':2}{'name':<14}{'version':<27}{'base':<10}{'test n':>7}{'acc':>7}{'AUC':>7}  sha256")
    for row in rows:
        accuracy = "" if row["test_accuracy"] is None else f"{row['test_accuracy']:.3f}"
        auc = "" if row["test_auc"] is None else f"{row['test_auc']:.3f}"
        print(f"{'*' if row['active'] else ' ':2}{row['name']:<14}{row['version']:<27}{str(row['base_weights']):<10}"
              f"{row['test_n'] or '':>7}{accuracy:>7}{auc:>7}  {row['sha256'][:16]}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from model_store.registry import find

    settings = settings_from_args(args)
    record = find(settings, *_parse_model(args.model, settings))
    shown: dict[str, Any] = {"active": record.active, **record.metadata_json}
    print(json.dumps(shown, indent=2))
    return 0


def _import(args: argparse.Namespace) -> int:
    from model_store.registry import activation_note, import_artifact

    forced = " --force" if args.force else ""
    record = import_artifact(settings_from_args(args), args.path, activate=args.activate, name=args.name,
                             force=args.force,
                             activated_by=activation_note(f"covid-cxr models import {args.path} --activate{forced}"))
    print(f"registered {record.name} {record.version} (sha256 {record.sha256}){' (active)' if record.active else ''}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from model_store.registry import export, find

    settings = settings_from_args(args)
    record = find(settings, *_parse_model(args.model, settings))
    out = export(settings, record, args.out)
    print(f"exported {record.name} {record.version} to {out}")
    return 0


def _activate(args: argparse.Namespace) -> int:
    from model_store.registry import activate, activation_note

    settings = settings_from_args(args)
    name, version = _parse_model_version(args.model, settings)
    options = (" --force" if args.force else "") + (f" --threshold {args.threshold}" if args.threshold else "")
    record = activate(settings, name, version, force=args.force, threshold=args.threshold,
                      activated_by=activation_note(f"covid-cxr models activate{options} {name}:{version}"))
    print(f"active: {record.name} {record.version}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from model_store.artifact import load_verified_model, model_path_of, read_metadata
    from model_store.evaluation import evaluate
    from model_store.registry import find, load_registered_model

    settings = settings_from_args(args)
    dataset = _dataset(args)
    if args.artifact is not None:
        metadata = read_metadata(args.artifact)
        model = load_verified_model(model_path_of(args.artifact), metadata["sha256"])
    else:
        record = find(settings, *_parse_model(args.model, settings))
        metadata = dict(record.metadata_json)
        model = load_registered_model(settings, record)
    out = args.out or settings.reports / f"evaluate-{metadata['version']}-{_utc_stamp()}"
    _, files = evaluate(model, metadata, dataset, out, part=args.part, threshold=args.threshold, settings=settings,
                        progress=args.progress, group_by=args.group_by)
    # The report names files and quotes header values (subgroups): shown on a terminal, they are escaped.
    sys.stdout.write(printable_lines(Path(files["text"]).read_text()))
    print("written: " + printable(", ".join(files.values())))
    return 0
