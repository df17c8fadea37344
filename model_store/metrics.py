"""The one implementation of every evaluation metric (no TensorFlow: the nightly job imports it from a light process).

Every proportion is reported with its counts (``k`` of ``n``) and a 95% Wilson interval, and is ``None``
(not 0) when it is undefined, e.g. sensitivity when no positive case was seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest, rankdata
from sklearn.metrics import brier_score_loss, classification_report, confusion_matrix, roc_auc_score

from covid_cxr.constants import CLASS_NAMES, POSITIVE_CLASS


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion ``k / n`` (scipy's implementation).

    Returns ``None`` when ``n == 0``: the proportion is undefined, not zero.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None
    interval = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def proportion(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """``{"k", "n", "value", "ci"}`` for one proportion; ``value`` and ``ci`` are ``None`` when ``n == 0``."""
    return {"k": int(k), "n": int(n), "value": (k / n) if n else None, "ci": wilson_interval(k, n, confidence)}


def binary_report(
    y_true: Sequence[str] | np.ndarray,
    y_score: Sequence[float] | np.ndarray,
    threshold: float = 0.5,
    positive: str = POSITIVE_CLASS,
    classes: Sequence[str] = CLASS_NAMES,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the evaluation report states about one binary classifier on one labelled set.

    Parameters
    ----------
    y_true
        True class names (strings from ``classes``).
    y_score
        Predicted probability of ``positive`` per case.
    threshold
        A case is predicted ``positive`` when its score is ``>= threshold`` (with 0.5 this equals the
        origin's argmax over a softmax whose first class is the positive one).
    positive, classes
        The positive class and the two class names (report order).
    bootstrap, seed
        Resamples (and their seed) for the ROC AUC and F1 percentile intervals; 0 disables them.

    Returns
    -------
    dict
        ``n``, ``counts`` (per true class), ``confusion_matrix`` (rows = true, columns = predicted, in
        ``classes`` order), ``tp``/``fp``/``tn``/``fn``; ``accuracy``, ``sensitivity``, ``specificity``,
        ``ppv``, ``npv`` as :func:`proportion` dicts with Wilson intervals; ``per_class`` recall
        (sensitivity) and precision (PPV) per class as COVID-Net reports them; ``f1`` (value with a
        bootstrap interval: F1 is not a binomial proportion, so it has no Wilson interval); ``roc_auc``
        with a bootstrap interval (``None`` when only one class is present); ``brier``;
        ``classification_report`` (scikit-learn's text).
    """
    classes = tuple(classes)
    if len(classes) != 2 or positive not in classes:
        raise ValueError(f"need two classes including the positive one, got classes={classes}, positive={positive!r}")
    negative = classes[1] if classes[0] == positive else classes[0]
    truth = np.asarray(y_true, dtype=object)
    scores = np.asarray(y_score, dtype=float)
    if truth.shape != scores.shape or truth.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-D and equally long, got {truth.shape} and {scores.shape}")
    unknown = sorted({str(label) for label in truth} - set(classes))
    if unknown:
        raise ValueError(f"y_true has labels {unknown} outside the classes {list(classes)}")
    if np.any(~np.isfinite(scores)) or np.any((scores < 0) | (scores > 1)):
        raise ValueError("y_score must be probabilities in [0, 1]")

    is_positive = truth == positive
    predicted_positive = scores >= threshold
    predicted = np.where(predicted_positive, positive, negative).astype(object)
    n = int(truth.size)
    tp = int(np.sum(is_positive & predicted_positive))
    fn = int(np.sum(is_positive & ~predicted_positive))
    fp = int(np.sum(~is_positive & predicted_positive))
    tn = int(np.sum(~is_positive & ~predicted_positive))
    matrix = confusion_matrix(truth, predicted, labels=list(classes)).tolist() if n else [[0, 0], [0, 0]]

    recall = {positive: proportion(tp, tp + fn), negative: proportion(tn, tn + fp)}
    precision = {positive: proportion(tp, tp + fp), negative: proportion(tn, tn + fn)}
    report: dict[str, Any] = {
        "n": n,
        "classes": list(classes),
        "positive": positive,
        "threshold": float(threshold),
        "counts": {name: int(np.sum(truth == name)) for name in classes},
        "confusion_matrix": matrix,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": proportion(tp + tn, n),
        "sensitivity": recall[positive],
        "specificity": recall[negative],
        "ppv": precision[positive],
        "npv": precision[negative],
        "per_class": {name: {"sensitivity": recall[name], "ppv": precision[name]} for name in classes},
        "f1": _f1_with_interval(is_positive, predicted_positive, bootstrap, seed),
        "roc_auc": _auc_with_interval(is_positive, scores, bootstrap, seed),
        "brier": float(brier_score_loss(is_positive.astype(int), scores)) if n else None,
        "classification_report": (
            classification_report(truth, predicted, labels=list(classes), digits=4, zero_division=0) if n else ""
        ),
    }
    return report


def _f1(is_positive: np.ndarray, predicted_positive: np.ndarray) -> float | None:
    tp = np.sum(is_positive & predicted_positive)
    denominator = 2 * tp + np.sum(is_positive != predicted_positive)
    return float(2 * tp / denominator) if denominator else None


def _f1_with_interval(is_positive: np.ndarray, predicted_positive: np.ndarray, bootstrap: int,
                      seed: int) -> dict[str, Any]:
    value = _f1(is_positive, predicted_positive)
    samples: list[float] = []
    if value is not None and bootstrap > 0:
        rng = np.random.default_rng(seed)
        for _ in range(bootstrap):
            index = rng.integers(0, is_positive.size, is_positive.size)
            f1 = _f1(is_positive[index], predicted_positive[index])
            if f1 is not None:
                samples.append(f1)
    return {"value": value, "ci": _percentile_interval(samples), "ci_method": "bootstrap percentile",
            "bootstrap_resamples": len(samples)}


def _auc_with_interval(is_positive: np.ndarray, scores: np.ndarray, bootstrap: int, seed: int) -> dict[str, Any]:
    """ROC AUC with a percentile bootstrap interval; resamples holding one class only are skipped (and counted)."""
    if is_positive.size == 0 or is_positive.all() or not is_positive.any():
        return {"value": None, "ci": None, "ci_method": "bootstrap percentile", "bootstrap_resamples": 0}
    value = float(roc_auc_score(is_positive, scores))
    samples: list[float] = []
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        index = rng.integers(0, is_positive.size, is_positive.size)
        resampled = is_positive[index]
        if resampled.all() or not resampled.any():
            continue
        samples.append(_rank_auc(resampled, scores[index]))
    return {"value": value, "ci": _percentile_interval(samples), "ci_method": "bootstrap percentile",
            "bootstrap_resamples": len(samples)}


def _rank_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half): what ``roc_auc_score`` computes, to rounding,
    without its input checks, which made a 1000-resample bootstrap cost 1.6 s per report row."""
    ranks = rankdata(scores)
    positives = int(is_positive.sum())
    negatives = is_positive.size - positives
    return float((ranks[is_positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _percentile_interval(samples: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    if not samples:
        return None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def format_proportion(entry: dict[str, Any]) -> str:
    """``0.9000 (9/10, 95% CI 0.5958-0.9821)``, or ``undefined (0/0)``."""
    if entry.get("value") is None:
        counts = f"{entry['k']}/{entry['n']}" if "k" in entry else "n/a"
        return f"undefined ({counts})"
    ci = entry.get("ci")
    interval = f", 95% CI {ci[0]:.4f}-{ci[1]:.4f}" if ci else ""
    counts = f"{entry['k']}/{entry['n']}" if "k" in entry else ""
    inside = ", ".join(part for part in (counts, interval.lstrip(", ")) if part)
    return f"{entry['value']:.4f} ({inside})" if inside else f"{entry['value']:.4f}"


#: Balanced accuracy at or below 0.5 + this margin counts as chance for :func:`degeneracy`.
CHANCE_MARGIN = 0.05


def degeneracy(report: dict[str, Any], part: str) -> list[str]:
    """Why a :func:`binary_report` shows a degenerate classifier on ``part``: one class predicted for every image,
    or balanced accuracy (mean of sensitivity and specificity) within :data:`CHANCE_MARGIN` of chance. Empty if
    neither (or if the part is empty)."""
    if not report["n"]:
        return []
    reasons = []
    positive, negative = report["positive"], next(name for name in report["classes"] if name != report["positive"])
    predicted_positive = report["tp"] + report["fp"]
    if predicted_positive in (0, report["n"]):
        only = positive if predicted_positive else negative
        reasons.append(f"predicts {only!r} for all {report['n']} images of the {part} part "
                       f"(threshold {report['threshold']:.4g})")
    sensitivity, specificity = report["sensitivity"]["value"], report["specificity"]["value"]
    if sensitivity is not None and specificity is not None:
        balanced = (sensitivity + specificity) / 2
        if balanced <= 0.5 + CHANCE_MARGIN:
            reasons.append(f"balanced accuracy {balanced:.3f} on the {part} part is at chance "
                           f"(<= {0.5 + CHANCE_MARGIN})")
    return reasons
