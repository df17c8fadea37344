"""Calibration error of a deliberately miscalibrated score set, and its reduction by the fitted scaling."""

from __future__ import annotations

import numpy as np
import pytest

from model_store.calibration import (
    apply_calibration,
    calibration_summary,
    expected_calibration_error,
    fit_calibration,
    reliability_bins,
)


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn with true probability p, scores that push p towards 0 and 1 (logit x 3)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.95, n)
    outcomes = rng.uniform(size=n) < p
    logit = np.log(p / (1 - p))
    return outcomes, 1 / (1 + np.exp(-3 * logit))


def test_ece_of_a_perfect_and_of_a_miscalibrated_set() -> None:
    truth = np.array([True, False, True, False])
    assert expected_calibration_error(truth, [1.0, 0.0, 1.0, 0.0]) == 0.0
    # every case scored 0.9, half positive: |0.9 - 0.5| in one bin.
    assert expected_calibration_error(truth, [0.9] * 4) == pytest.approx(0.4)
    assert expected_calibration_error([], []) is None
    bins = reliability_bins(truth, [0.9] * 4)
    assert sum(row["n"] for row in bins) == 4 and bins[9]["fraction_positive"] == 0.5 and bins[0]["n"] == 0


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_fitted_scaling_reduces_the_error_on_held_out_cases(method: str) -> None:
    fit_truth, fit_scores = _overconfident(2000, seed=1)
    test_truth, test_scores = _overconfident(2000, seed=2)
    before = expected_calibration_error(test_truth, test_scores)
    assert before is not None and before > 0.08  # detected: clearly miscalibrated
    fitted = fit_calibration(fit_truth, fit_scores, method, "fixture")
    after = expected_calibration_error(test_truth, apply_calibration(test_scores, fitted))
    assert after is not None and after < before / 2 and after < 0.04
    assert fitted["ece_after"] < fitted["ece_before"] and fitted["fitted_on"] == "fixture"
    if method == "temperature":
        assert fitted["temperature"] == pytest.approx(3.0, rel=0.2)  # undoes the x3 on the logit
    # ranking (hence AUC) is unchanged by a monotone scaling
    assert np.array_equal(np.argsort(test_scores), np.argsort(apply_calibration(test_scores, fitted)))


def test_no_calibration_leaves_scores_alone_and_reports_say_so() -> None:
    scores = np.array([0.2, 0.7])
    assert np.array_equal(apply_calibration(scores, None), scores)
    assert np.array_equal(apply_calibration(scores, {"method": "none"}), scores)
    assert calibration_summary([False, True], scores, None)["calibrated"] is False
    assert calibration_summary([False, True], scores, {"method": "temperature", "temperature": 2.0})["calibrated"]
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration([True, True], [0.4, 0.6], "platt", "x")
