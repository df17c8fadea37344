"""A model card per registered version, in Markdown and HTML, from its metadata and latest reports.

Both formats come from the same context through Jinja2 templates (``model_card.md.j2``, ``model_card.html.j2``,
autoescaped); every figure is the one the metadata or the cited report holds, with its interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from model_store.metrics import format_proportion
from model_store.report_render import interval_text

INTENDED_USE = ("Research and engineering of a COVID-19 chest X-ray triage pipeline: ranking frontal chest "
                "radiographs by P(covid) for review by people. Not for diagnosis or any clinical decision.")
NOT_A_MEDICAL_DEVICE = ("This model is NOT a medical device. It has no regulatory clearance, was trained on small "
                        "public collections and must not be used to diagnose, treat or triage patients.")
#: How many of the version's latest nightly reports the card lists.
NIGHTLY_SHOWN = 3
#: Limitations that hold for every version trained on the public collections this project uses.
KNOWN_LIMITATIONS = (
    "Public COVID-19 collections differ from their controls in source hospital, age (pediatric normals), "
    "view, markers and image processing: a model can learn these shortcuts instead of disease "
    "(DeGrave et al., Nat. Mach. Intell. 2021). Check the subgroup tables and the shortcut baseline.",
    "Test sets are small: read every figure with its interval, not as a point.",
    "Labels come from the source collections (some NLP-mined), not from a reference standard such as RT-PCR.",
    "Trained with random base weights (no ImageNet weights were available here) unless the card says otherwise.",
)


def _environment() -> Environment:
    # HTML is autoescaped; Markdown is not (an escaped apostrophe would show as &#39; in the .md file).
    environment = Environment(loader=PackageLoader("model_store"), undefined=StrictUndefined,
                              autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    environment.filters["proportion"] = format_proportion
    environment.filters["interval"] = interval_text
    return environment


def card_context(metadata: Mapping[str, Any], nightly: Sequence[Mapping[str, Any]] = (),
                 activation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the card states, from an artifact's metadata, the latest nightly reports (``window``, ``level``, ``n``,
    ``created_at``, ``metrics``, ``flags``) and the registry's activation record."""
    metrics = metadata.get("metrics") or {}
    data = metadata.get("data") or {}
    source = data.get("source") or {}
    paths = source.get("path")
    degenerate = metadata.get("degenerate") or {"degenerate": False, "reasons": []}
    calibration = {"fitted_on": None, **(metadata.get("calibration") or {"method": "none"})}
    return {
        "name": metadata.get("name"), "version": metadata.get("version"), "sha256": metadata.get("sha256"),
        "created_at": metadata.get("created_at"),
        "intended_use": INTENDED_USE, "not_a_medical_device": NOT_A_MEDICAL_DEVICE,
        "architecture": (metadata.get("architecture") or {}).get("name"),
        "base_weights": (metadata.get("base_weights") or {}).get("source"),
        "preprocessing_version": metadata.get("preprocessing_version"),
        "data": {"source": " + ".join(paths) if isinstance(paths, list) else paths,
                 "where": source.get("where") or {}, "n_images": data.get("n_images"),
                 "n_patients": data.get("n_patients"), "counts": data.get("counts") or {},
                 "sha256": data.get("sha256"), "split": {part: (data.get("split") or {}).get(part)
                                                         for part in ("train", "validation", "test")}},
        "test": metrics.get("test"), "baseline": metrics.get("baseline_test"),
        "shortcut": metrics.get("shortcut_check"), "calibration": calibration,
        "test_calibration": {"ece": None, "calibrated": False, **(metrics.get("test_calibration") or {})},
        "subgroups": metrics.get("test_subgroups") or {},
        "operating_point": {"rule": "fixed", "chosen_on": "given", **(metadata.get("operating_point") or {})},
        "threshold": float(metadata.get("decision_threshold", 0.5)), "degenerate": degenerate,
        "nightly": list(nightly), "activation": dict(activation) if activation else None,
        "limitations": list(KNOWN_LIMITATIONS),
    }


def render_card(context: Mapping[str, Any]) -> tuple[str, str]:
    """``(markdown, html)`` of one model card."""
    environment = _environment()
    return (environment.get_template("model_card.md.j2").render(**context),
            environment.get_template("model_card.html.j2").render(**context))


def registered_card_context(settings: Any, name: str, version: str | None) -> dict[str, Any]:
    """:func:`card_context` of a registered version (default: the active one), with its last nightly reports."""
    from sqlalchemy import select

    from db.models import EvaluationReport
    from db.session import session_scope
    from model_store.registry import find

    record = find(settings, name, version)
    with session_scope(settings) as session:
        reports = session.scalars(select(EvaluationReport).where(EvaluationReport.model_version == record.version)
                                  .order_by(EvaluationReport.created_at.desc()).limit(NIGHTLY_SHOWN)).all()
        nightly = [{"created_at": report.created_at.isoformat(timespec="seconds"), "window": report.window,
                    "level": report.level, "n": report.n, "metrics": report.metrics, "flags": report.flags}
                   for report in reports]
    activation = ({"activated_at": record.activated_at.isoformat(timespec="seconds"),
                   "activated_by": record.activated_by, "threshold_override": record.threshold_override}
                  if record.activated_at else None)
    return card_context(dict(record.metadata_json), nightly, activation)


def write_card(context: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Write ``model_card.md`` and ``model_card.html`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, html = render_card(context)
    paths = {"markdown": out_dir / "model_card.md", "html": out_dir / "model_card.html"}
    paths["markdown"].write_text(markdown)
    paths["html"].write_text(html)
    return {kind: str(path) for kind, path in paths.items()}
