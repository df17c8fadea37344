"""Drift of served inputs and outputs against the model's training reference, by population-stability index.

No TensorFlow here: the evaluation job runs on CPU workers.

The trainer stores :func:`training_reference` as ``metadata["reference"]`` of an artifact: binned
distributions of the predicted COVID probability and of the per-image pixel mean and standard
deviation (the statistics the ingester stores in ``normalized_images``) on the training/validation
images. The evaluation job bins a window's values on the same cut points and compares with
:func:`population_stability_index`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: The quantities a reference describes, in report order.
QUANTITIES: tuple[str, ...] = ("prob_covid", "image_mean", "image_std")
#: Conventional reading of the PSI: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 significant shift.
PSI_THRESHOLD = 0.2
#: Below this many window values the PSI is reported but raises no flag: with 10 bins, a window of n
#: values drawn from the reference itself has PSI of about 9/n on average (chi-square with 9 degrees
#: of freedom over n), so windows smaller than ~100 would cross 0.2 by chance alone.
MIN_DRIFT_N = 100
#: Empty bins get this proportion so that the logarithm stays finite.
PSI_EPSILON = 1e-4
REFERENCE_FORMAT = 1

#: Probabilities are binned on fixed tenths: a trained classifier's outputs pile up near 0 and 1,
#: where quantile bins would collapse.
PROBABILITY_CUT_POINTS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))
#: Image statistics are binned on the reference's deciles.
QUANTILE_BINS = 10


def _as_values(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def bin_proportions(values: Sequence[float] | np.ndarray, cut_points: Sequence[float]) -> np.ndarray:
    """Share of ``values`` in each bin ``(-inf, c1], (c1, c2], ..., (ck, inf)``; ``len(cut_points) + 1`` bins."""
    array = _as_values(values, "values")
    if array.size == 0:
        raise ValueError("no values to bin")
    index = np.digitize(array, np.asarray(cut_points, dtype=float), right=True)
    return np.bincount(index, minlength=len(cut_points) + 1) / array.size


def population_stability_index(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
                               epsilon: float = PSI_EPSILON) -> float:
    """PSI = sum over bins of ``(actual - expected) * ln(actual / expected)``.

    Parameters
    ----------
    expected, actual
        Bin proportions (each summing to 1) of the reference and of the compared sample.
    epsilon
        Floor for empty bins, so that a bin empty on one side adds a large but finite term.
    """
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    if e.shape != a.shape or e.ndim != 1 or e.size < 2:
        raise ValueError(f"need two equally long 1-D proportion vectors, got shapes {e.shape} and {a.shape}")
    if np.any(e < 0) or np.any(a < 0) or not (np.isclose(e.sum(), 1) and np.isclose(a.sum(), 1)):
        raise ValueError("proportions must be non-negative and sum to 1")
    e = np.maximum(e, epsilon)
    a = np.maximum(a, epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def reference_distribution(values: Sequence[float] | np.ndarray,
                           cut_points: Sequence[float] | None = None) -> dict[str, Any]:
    """One quantity's reference: cut points (the deciles of ``values`` unless given), bin proportions, n, mean, std."""
    array = _as_values(values, "values")
    if array.size == 0:
        raise ValueError("a reference needs at least one value")
    if cut_points is None:
        deciles = np.quantile(array, np.linspace(0, 1, QUANTILE_BINS + 1)[1:-1])
        cut_points = [float(c) for c in np.unique(deciles)]
    return {
        "cut_points": [float(c) for c in cut_points],
        "proportions": [float(p) for p in bin_proportions(array, cut_points)],
        "n": int(array.size),
        "mean": float(array.mean()),
        "std": float(array.std()),
    }


def training_reference(prob_covid: Sequence[float] | np.ndarray, image_means: Sequence[float] | np.ndarray,
                       image_stds: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """The drift reference to store as an artifact's ``metadata["reference"]`` (JSON-ready).

    Parameters
    ----------
    prob_covid
        Predicted COVID probability of the model on reference images (e.g. its validation split).
    image_means, image_stds
        Pixel mean and standard deviation (0..255) of the same images' normalized 224x224 inputs.
    """
    probabilities = _as_values(prob_covid, "prob_covid")
    if probabilities.size and (probabilities.min() < 0 or probabilities.max() > 1):
        raise ValueError("prob_covid must be probabilities in [0, 1]")
    return {
        "format": REFERENCE_FORMAT,
        "prob_covid": reference_distribution(probabilities, PROBABILITY_CUT_POINTS),
        "image_mean": reference_distribution(image_means),
        "image_std": reference_distribution(image_stds),
    }


def compare_to_reference(reference: Mapping[str, Any], values: Sequence[float] | np.ndarray,
                         threshold: float = PSI_THRESHOLD, min_n: int = MIN_DRIFT_N) -> dict[str, Any]:
    """PSI of ``values`` against one quantity's reference, with a status.

    ``status`` is ``drift`` (PSI above ``threshold``, window and reference both holding at least
    ``min_n`` values), ``ok``, ``too_few`` (PSI reported, no verdict: either sample is too small for
    the PSI to separate drift from chance) or ``no_data``.
    """
    array = _as_values(values, "values")
    result: dict[str, Any] = {"n": int(array.size), "reference_n": int(reference["n"]),
                              "reference_mean": reference["mean"], "mean": None, "psi": None,
                              "cut_points": list(reference["cut_points"]),
                              "expected": list(reference["proportions"]), "actual": None}
    if array.size == 0:
        return {**result, "status": "no_data"}
    actual = bin_proportions(array, reference["cut_points"])
    psi = population_stability_index(reference["proportions"], actual)
    status = "too_few" if array.size < min_n or int(reference["n"]) < min_n else "drift" if psi > threshold else "ok"
    return {**result, "mean": float(array.mean()), "psi": psi, "actual": [float(p) for p in actual], "status": status}


def _reference_problem(reference: Any) -> str | None:
    if not isinstance(reference, Mapping):
        return "the model has no training reference (metadata['reference'])"
    for name in QUANTITIES:
        entry = reference.get(name)
        if not isinstance(entry, Mapping) or not {"cut_points", "proportions", "n", "mean"} <= set(entry):
            return f"the model's training reference has no usable {name!r} entry"
        if len(entry["proportions"]) != len(entry["cut_points"]) + 1:
            return f"the model's training reference for {name!r} has inconsistent bins"
    return None


def drift_report(reference: Mapping[str, Any] | None, prob_covid: Sequence[float] | np.ndarray,
                 image_means: Sequence[float] | np.ndarray, image_stds: Sequence[float] | np.ndarray,
                 threshold: float = PSI_THRESHOLD, min_n: int = MIN_DRIFT_N) -> dict[str, Any]:
    """Compare a window with the training reference; never raises for a missing or malformed reference.

    Returns
    -------
    dict
        ``status`` (``drift`` | ``ok`` | ``too_few`` | ``no_data`` | ``unavailable``), ``threshold``,
        ``min_n``, ``flags`` (``drift_<quantity>`` for each quantity over the threshold) and one
        :func:`compare_to_reference` entry per quantity; ``reason`` when unavailable.
    """
    base = {"threshold": threshold, "min_n": min_n, "flags": []}
    problem = _reference_problem(reference)
    if problem is not None:
        return {**base, "status": "unavailable", "reason": problem, **{name: None for name in QUANTITIES}}
    assert reference is not None
    samples = {"prob_covid": prob_covid, "image_mean": image_means, "image_std": image_stds}
    entries = {name: compare_to_reference(reference[name], samples[name], threshold, min_n) for name in QUANTITIES}
    flags = [f"drift_{name}" for name, entry in entries.items() if entry["status"] == "drift"]
    statuses = {entry["status"] for entry in entries.values()}
    if flags:
        status = "drift"
    elif statuses == {"no_data"}:
        status = "no_data"
    elif "too_few" in statuses or "no_data" in statuses:
        status = "too_few"
    else:
        status = "ok"
    return {**base, "status": status, "flags": flags, **entries}
