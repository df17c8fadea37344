"""Metrics per subgroup (origin, view, manufacturer, sex, age band...), each with its n and intervals.

A subgroup whose ROC AUC interval lies entirely below the overall one is flagged: the overall figure hides it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model_store.metrics import binary_report

#: The value a subgroup table shows for a case that lacks the attribute.
MISSING = "(missing)"
#: The DICOM header facts an offline evaluation groups by, named as the nightly report names them (the fields of
#: :class:`ingest.metadata.InstanceMetadata`): nothing identifying, the age only as a decade band.
HEADER_ATTRIBUTES: tuple[str, ...] = ("manufacturer", "modality", "view_position", "institution_name", "patient_sex",
                                      "age_band")


def header_attributes(headers: Sequence[Mapping[str, str | None]]) -> dict[str, list[str | None]]:
    """Per :data:`HEADER_ATTRIBUTES` name that at least one case has, every case's value (``None`` where a case
    lacks it: a PNG, or a header without the element); a set where no case has an attribute gets no table for it."""
    attributes: dict[str, list[str | None]] = {}
    for name in HEADER_ATTRIBUTES:
        values = [header.get(name) for header in headers]
        if any(value not in (None, "") for value in values):
            attributes[name] = values
    return attributes


def subgroup_metrics(labels: Sequence[str] | np.ndarray, scores: Sequence[float] | np.ndarray,
                     attributes: Mapping[str, Sequence[str | None]], overall: Mapping[str, Any], *,
                     threshold: float, seed: int = 0, bootstrap: int = 1000) -> dict[str, list[dict[str, Any]]]:
    """Per attribute, one row per value (sorted by value): n, counts, accuracy, sensitivity, specificity (Wilson
    intervals), ROC AUC (bootstrap interval; ``None`` with one class) and ``flag``.

    ``overall`` is the whole set's :func:`~model_store.metrics.binary_report`; its AUC interval is the reference.
    """
    truth = np.asarray(labels, dtype=object)
    values = np.asarray(scores, dtype=float)
    overall_ci = (overall.get("roc_auc") or {}).get("ci")
    tables: dict[str, list[dict[str, Any]]] = {}
    for attribute, per_case in attributes.items():
        groups = np.asarray([MISSING if value in (None, "") else str(value) for value in per_case], dtype=object)
        if groups.shape != truth.shape:
            raise ValueError(f"attribute {attribute!r} has {groups.size} values for {truth.size} cases")
        rows = []
        for group in sorted(set(groups.tolist())):
            chosen = groups == group
            report = binary_report(truth[chosen], values[chosen], threshold=threshold, seed=seed, bootstrap=bootstrap)
            auc = report["roc_auc"]
            flag = None
            if overall_ci and auc["ci"] and auc["ci"][1] < overall_ci[0]:
                flag = "AUC interval entirely below the overall one"
            rows.append({"group": group, "n": report["n"], "counts": report["counts"],
                         "accuracy": report["accuracy"], "sensitivity": report["sensitivity"],
                         "specificity": report["specificity"], "roc_auc": auc, "flag": flag})
        tables[attribute] = rows
    return tables


def with_header_attributes(from_csv: dict[str, list[str | None]], headers: Sequence[Mapping[str, str | None]],
                           notes: list[str]) -> dict[str, list[str | None]]:
    """The ``--group-by`` CSV columns first, then the header facts the DICOM files among the cases have; what
    came from where is said in ``notes`` (a CSV column wins over a header table of the same name)."""
    from_headers = header_attributes(headers)
    shadowed = sorted(set(from_csv) & set(from_headers))
    if shadowed:
        notes.append(f"subgroup tables {', '.join(shadowed)} come from the CSV, not from the DICOM headers")
    if set(from_headers) - set(from_csv):
        notes.append(f"subgroup tables {', '.join(name for name in from_headers if name not in from_csv)} come from "
                     f"the DICOM headers (sex and age band only of the patient; images without the attribute, PNG "
                     f"and JPEG included, are counted as {MISSING})")
    return {**from_csv, **{name: values for name, values in from_headers.items() if name not in from_csv}}
