"""The metrics of one nightly report, computed from its cases alone (no database, no files).

Every metric comes from :mod:`model_store.metrics`, drift from :mod:`model_store.drift`, so a nightly
report and the trainer's test report state the same figures the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from covid_cxr.constants import CLASS_NAMES, POSITIVE_CLASS
from model_store.calibration import calibration_summary
from model_store.drift import QUANTITIES, drift_report
from model_store.metrics import binary_report
from model_store.subgroups import subgroup_metrics

#: The levels a report is computed at, in report order.
LEVELS: tuple[str, ...] = ("image", "study")
#: Bootstrap resamples for the F1 and ROC AUC intervals.
BOOTSTRAP_RESAMPLES = 1000
#: Fixed bins of the predicted probability for the score distribution.
SCORE_BIN_EDGES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

#: Flags a report can raise (besides ``drift_<quantity>`` from :func:`model_store.drift.drift_report`).
FLAG_NO_LABELS = "no_labelled_predictions"
FLAG_LABEL_CONFLICTS = "label_conflicts"
FLAG_DECISION_MISMATCH = "decision_mismatch"


@dataclass
class Cases:
    """The rows one report is computed from: one per image (or study) with a prediction in the window."""

    prob_covid: np.ndarray
    predicted_label: list[str]
    true_label: list[str | None]
    label_status: list[str | None]
    threshold: float
    image_mean: np.ndarray = field(default_factory=lambda: np.empty(0))
    image_std: np.ndarray = field(default_factory=lambda: np.empty(0))
    #: Per subgroup attribute (``view_position``, ``manufacturer``...), one value per case.
    attributes: dict[str, list[str | None]] = field(default_factory=dict)

    @property
    def labelled(self) -> np.ndarray:
        return np.array([label is not None for label in self.true_label], dtype=bool)

    @property
    def labelled_truth(self) -> list[str]:
        """True labels of the labelled cases, in the order of ``prob_covid[labelled]``."""
        return [label for label in self.true_label if label is not None]


def score_distribution(cases: Cases) -> dict[str, Any]:
    """Histogram of P(covid) on fixed tenths, overall and by true label, with quantiles."""
    edges = np.array(SCORE_BIN_EDGES)

    def histogram(mask: np.ndarray) -> list[int]:
        return [int(c) for c in np.histogram(cases.prob_covid[mask], bins=edges)[0]]

    truth = np.array([label or "" for label in cases.true_label], dtype=object)
    everything = np.ones(cases.prob_covid.size, dtype=bool)
    counts = {"all": histogram(everything), **{name: histogram(truth == name) for name in CLASS_NAMES},
              "unlabelled": histogram(truth == "")}
    quantiles = None
    if cases.prob_covid.size:
        values = np.quantile(cases.prob_covid, [0.05, 0.25, 0.5, 0.75, 0.95])
        quantiles = dict(zip(("p05", "p25", "median", "p75", "p95"), (float(v) for v in values), strict=True))
    return {"bin_edges": list(SCORE_BIN_EDGES), "counts": counts, "quantiles": quantiles,
            "mean": float(cases.prob_covid.mean()) if cases.prob_covid.size else None}


def compute_report(cases: Cases, level: str, reference: dict[str, Any] | None,
                   bootstrap: int | None = None,
                   calibration: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The metrics JSON of one report and its flags; pure (no database, no files).

    ``calibration`` is the model's stored scaling (the served scores already went through it); the report says
    whether scores were calibrated, their calibration error, and the subgroup tables of ``cases.attributes``.
    """
    labelled = cases.labelled
    resamples = BOOTSTRAP_RESAMPLES if bootstrap is None else bootstrap
    performance = binary_report(cases.labelled_truth, cases.prob_covid[labelled], threshold=cases.threshold,
                                positive=POSITIVE_CLASS, classes=CLASS_NAMES, bootstrap=resamples)
    truth = np.array(cases.labelled_truth, dtype=object)
    subgroups = subgroup_metrics(truth, cases.prob_covid[labelled],
                                 {name: [v for v, keep in zip(values, labelled, strict=True) if keep]
                                  for name, values in cases.attributes.items()},
                                 performance, threshold=cases.threshold, bootstrap=resamples)
    served = np.array([label == POSITIVE_CLASS for label in cases.predicted_label], dtype=bool)
    mismatches = int(np.sum(served != (cases.prob_covid >= cases.threshold)))
    conflicts = sum(1 for status in cases.label_status if status == "conflict")
    population = {
        "predictions": int(cases.prob_covid.size),
        "labelled": int(labelled.sum()),
        "unlabelled": int(cases.prob_covid.size - labelled.sum() - conflicts),
        "conflicting_labels": conflicts,
        "predicted": {name: int(sum(1 for p in cases.predicted_label if p == name)) for name in CLASS_NAMES},
        "decision_mismatches": mismatches,
    }
    if level == "image":
        drift = drift_report(reference, cases.prob_covid, cases.image_mean, cases.image_std)
    else:
        drift = {"status": "not_applicable",
                 "reason": "the training reference describes images, see the image-level report",
                 "flags": [], **{name: None for name in QUANTITIES}}
    flags = list(drift["flags"])
    if performance["n"] == 0:
        flags.append(FLAG_NO_LABELS)
    if conflicts:
        flags.append(FLAG_LABEL_CONFLICTS)
    if mismatches:
        flags.append(FLAG_DECISION_MISMATCH)
    metrics = {"performance": performance, "population": population, "score_distribution": score_distribution(cases),
               "drift": drift, "subgroups": subgroups,
               "calibration": calibration_summary(truth == POSITIVE_CLASS, cases.prob_covid[labelled], calibration)}
    return metrics, flags


def json_ready(value: Any) -> Any:
    """Tuples to lists and numpy scalars to Python numbers, so the stored JSON reads back identical."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
