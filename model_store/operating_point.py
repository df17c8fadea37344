"""Choosing the decision threshold on P(covid) from labelled scores: fixed, Youden's J, or a target sensitivity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

#: ``fixed`` keeps the given threshold; ``youden`` maximises sensitivity + specificity - 1; ``sensitivity``
#: takes the highest threshold whose sensitivity reaches the target.
OPERATING_POINT_RULES: tuple[str, ...] = ("fixed", "youden", "sensitivity")


def choose_threshold(is_positive: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, rule: str,
                     *, fixed: float = 0.5, target_sensitivity: float | None = None,
                     chosen_on: str = "") -> dict[str, Any]:
    """The threshold (a case is positive when its score is ``>=`` it) and how it was chosen.

    Without both classes in the set, every rule falls back to ``fixed`` and says so.
    """
    if rule not in OPERATING_POINT_RULES:
        raise ValueError(f"operating point rule must be one of {', '.join(OPERATING_POINT_RULES)}, got {rule!r}")
    truth = np.asarray(is_positive, dtype=bool)
    values = np.asarray(scores, dtype=float)
    chosen: dict[str, Any] = {"rule": rule, "threshold": float(fixed), "chosen_on": chosen_on}
    if rule == "sensitivity":
        if target_sensitivity is None or not 0 < target_sensitivity <= 1:
            raise ValueError(f"a target sensitivity in (0, 1] is needed, got {target_sensitivity}")
        chosen["target_sensitivity"] = float(target_sensitivity)
    if rule == "fixed":
        return chosen
    if truth.size == 0 or truth.all() or not truth.any():
        chosen["note"] = "the set lacks a class: kept the fixed threshold"
        return chosen
    fpr, tpr, thresholds = roc_curve(truth, values, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "youden":
        best = int(np.argmax(tpr - fpr))
    else:
        reaching = np.flatnonzero(tpr >= float(target_sensitivity or 0) - 1e-12)
        best = int(reaching[0])  # thresholds decrease along the curve: the first is the highest
    chosen.update(threshold=float(np.clip(thresholds[best], 0.0, 1.0)), sensitivity=float(tpr[best]),
                  specificity=float(1 - fpr[best]))
    return chosen
