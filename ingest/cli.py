"""``covid-cxr inspect``: read one file as the service would and show the decision, the steps and the model's view."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covid_cxr.commandline import Subparsers, settings_from_args
from covid_cxr.errors import UsageError
from covid_cxr.settings import Settings

#: Writes a heatmap of one file with the active model (``settings, file, out`` -> summary); the composition root
#: passes :func:`model_store.explain.explain_file`, which this layer may not import.
Explainer = Callable[[Settings, Path, Path], dict[str, Any]]


def register(subparsers: Subparsers, common: argparse.ArgumentParser, explain: Explainer | None = None) -> None:
    """Add ``inspect``; `common` is the parent parser with the installation flags; with ``explain``, ``--explain``."""
    inspect = subparsers.add_parser(
        "inspect",
        parents=[common],
        help="read one DICOM file as the service would: decision, steps, and a PNG of what the model sees",
        description="Read FILE with the configured acceptance policy (COVID_CXR_ALLOWED_MODALITIES, "
        "COVID_CXR_MAX_PIXELS, COVID_CXR_MULTI_FRAME_POLICY) and show what was read, which pixel steps ran "
        "and whether it is accepted or rejected (with its reason code). Exits 0 for accepted and rejected "
        "files alike; 2 when FILE does not exist.",
    )
    inspect.add_argument("file", type=Path, metavar="FILE", help="the file to read (any name, any content)")
    inspect.add_argument("--png", type=Path, metavar="OUT",
                         help="write the normalized 224x224 image here (accepted files)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    if explain is not None:
        inspect.add_argument("--explain", type=Path, metavar="OUT.png",
                             help="write a Grad-CAM heatmap of the active model over the 224x224 input (if accepted)")
    inspect.set_defaults(func=_inspect, explainer=explain)


def _inspect(args: argparse.Namespace) -> int:
    from ingest.inspect import format_report, inspect_file
    from ingest.reader import ReaderPolicy

    path: Path = args.file
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    settings = settings_from_args(args)
    key = "configured" if settings.pseudonym_key is not None else "key file"
    if settings.pseudonym_key is None and not settings.pseudonym_key_file.exists():
        # A look at one file must not create an installation's key in whatever folder it runs in.
        settings, key = settings.with_ephemeral_pseudonym_key(), "ephemeral"
    policy = ReaderPolicy.from_settings(settings)
    try:
        report = inspect_file(path, policy, png=args.png)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from exc
    report["pseudonym_key"] = key
    if getattr(args, "explain", None) is not None and report["accepted"]:
        report["explain"] = args.explainer(settings, path, args.explain)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
