"""Calibration of P(covid): expected calibration error, reliability bins, and temperature or Platt scaling.

NumPy and SciPy only: the workers apply a model's stored scaling (see :func:`apply_calibration`) without
TensorFlow in this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize

from covid_cxr.constants import CALIBRATION_METHODS

#: Equal-width bins over [0, 1] of the reliability diagram and of the expected calibration error.
CALIBRATION_BINS = 10
#: Scores are clipped away from 0 and 1 before taking their logit.
_EPSILON = 1e-6


def reliability_bins(is_positive: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray,
                     bins: int = CALIBRATION_BINS) -> list[dict[str, Any]]:
    """Per equal-width score bin: its edges, ``n``, the mean score and the observed fraction of positives."""
    truth = np.asarray(is_positive, dtype=bool)
    values = np.asarray(scores, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(values, edges[1:-1], right=False), 0, bins - 1)
    rows = []
    for b in range(bins):
        chosen = index == b
        n = int(chosen.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": n,
                     "mean_score": float(values[chosen].mean()) if n else None,
                     "fraction_positive": float(truth[chosen].mean()) if n else None})
    return rows


def expected_calibration_error(is_positive: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float | None:
    """Sum over bins of (share of cases in the bin) x |mean score - fraction positive|; ``None`` without cases."""
    rows = reliability_bins(is_positive, scores, bins)
    total = sum(row["n"] for row in rows)
    if not total:
        return None
    return float(sum(row["n"] / total * abs(row["mean_score"] - row["fraction_positive"])
                     for row in rows if row["n"]))


def calibration_summary(is_positive: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray,
                        applied: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a report states about calibration: the ECE, the reliability bins and whether scores were rescaled."""
    return {"ece": expected_calibration_error(is_positive, scores), "bins": reliability_bins(is_positive, scores),
            "n_bins": CALIBRATION_BINS, "calibrated": bool(applied and applied.get("method") not in (None, "none")),
            "method": dict(applied) if applied else {"method": "none"}}


def _logit(scores: np.ndarray) -> np.ndarray:
    clipped = np.clip(scores, _EPSILON, 1 - _EPSILON)
    return np.asarray(np.log(clipped) - np.log1p(-clipped))


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-values)))


def _log_loss(is_positive: np.ndarray, probabilities: np.ndarray) -> float:
    p = np.clip(probabilities, _EPSILON, 1 - _EPSILON)
    return float(-np.mean(is_positive * np.log(p) + (1 - is_positive) * np.log(1 - p)))


def fit_calibration(is_positive: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray,
                    method: str, fitted_on: str) -> dict[str, Any]:
    """Fit ``temperature`` (one divisor of the logit) or ``platt`` (slope and intercept on the logit) scaling by
    minimising the log loss; returns what :func:`apply_calibration` needs, plus ``fitted_on`` and the ECE before
    and after on the fitting set."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    truth = np.asarray(is_positive, dtype=float)
    values = np.asarray(scores, dtype=float)
    if method == "none":
        return {"method": "none"}
    if truth.size == 0 or truth.min() == truth.max():
        raise ValueError("calibration needs both classes in the fitting set")
    logits = _logit(values)
    if method == "temperature":
        result = minimize(lambda p: _log_loss(truth, _sigmoid(logits / np.exp(p[0]))), x0=[0.0], method="Nelder-Mead")
        fitted: dict[str, Any] = {"method": "temperature", "temperature": float(np.exp(result.x[0]))}
    else:
        result = minimize(lambda p: _log_loss(truth, _sigmoid(p[0] * logits + p[1])), x0=[1.0, 0.0],
                          method="Nelder-Mead")
        fitted = {"method": "platt", "slope": float(result.x[0]), "intercept": float(result.x[1])}
    fitted["fitted_on"] = fitted_on
    fitted["ece_before"] = expected_calibration_error(truth, values)
    fitted["ece_after"] = expected_calibration_error(truth, apply_calibration(values, fitted))
    return fitted


def apply_calibration(scores: Sequence[float] | np.ndarray, calibration: Mapping[str, Any] | None) -> np.ndarray:
    """Rescale raw P(covid) scores with a model's stored calibration (``None`` or ``method: none``: unchanged)."""
    values = np.asarray(scores, dtype=float)
    method = (calibration or {}).get("method", "none")
    if method == "none":
        return values
    assert calibration is not None
    logits = _logit(values)
    if method == "temperature":
        return _sigmoid(logits / float(calibration["temperature"]))
    if method == "platt":
        return _sigmoid(float(calibration["slope"]) * logits + float(calibration["intercept"]))
    raise ValueError(f"unknown calibration method {method!r}")
