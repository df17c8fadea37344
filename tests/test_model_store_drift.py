"""Population-stability index and the training reference: hand-computed values, flags, missing references."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from model_store.drift import (
    MIN_DRIFT_N,
    PROBABILITY_CUT_POINTS,
    PSI_THRESHOLD,
    bin_proportions,
    drift_report,
    population_stability_index,
    training_reference,
)


def test_psi_equals_the_hand_computed_sum():
    expected, actual = [0.5, 0.5], [0.25, 0.75]
    by_hand = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert population_stability_index(expected, actual) == pytest.approx(by_hand)
    assert population_stability_index(expected, expected) == 0.0


def test_psi_of_an_empty_bin_is_large_but_finite():
    psi = population_stability_index([0.5, 0.5], [1.0, 0.0])
    assert math.isfinite(psi) and psi > 4


@pytest.mark.parametrize("expected, actual", [([1.0], [1.0]), ([0.5, 0.5], [0.5, 0.4]), ([0.5, 0.5], [0.2, 0.3, 0.5])])
def test_psi_refuses_malformed_proportions(expected, actual):
    with pytest.raises(ValueError):
        population_stability_index(expected, actual)


def test_bins_are_closed_on_the_right_and_open_at_both_ends():
    assert bin_proportions([-5, 0.1, 0.1000001, 0.9, 7], [0.1, 0.9]).tolist() == [0.4, 0.4, 0.2]


def test_training_reference_is_json_ready_and_uses_fixed_probability_bins():
    rng = np.random.default_rng(0)
    reference = training_reference(rng.uniform(0, 1, 500), rng.normal(120, 15, 500), rng.normal(55, 8, 500))
    assert json.loads(json.dumps(reference)) == reference
    assert reference["prob_covid"]["cut_points"] == list(PROBABILITY_CUT_POINTS)
    assert len(reference["image_mean"]["cut_points"]) == 9  # deciles
    assert reference["image_mean"]["proportions"] == pytest.approx([0.1] * 10)
    assert reference["image_std"]["n"] == 500


def test_training_reference_refuses_values_that_are_not_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        training_reference([0.2, 1.5], [100, 110], [50, 60])
    with pytest.raises(ValueError, match="NaN"):
        training_reference([0.2, 0.5], [100, float("nan")], [50, 60])


def test_same_distribution_is_ok_and_a_shifted_one_raises_a_flag():
    rng = np.random.default_rng(1)
    reference = training_reference(rng.beta(2, 5, 5000), rng.normal(120, 15, 5000), rng.normal(55, 8, 5000))
    same = drift_report(reference, rng.beta(2, 5, 400), rng.normal(120, 15, 400), rng.normal(55, 8, 400))
    assert same["status"] == "ok" and same["flags"] == []
    assert all(same[name]["psi"] < 0.1 for name in ("prob_covid", "image_mean", "image_std"))

    brighter = drift_report(reference, rng.beta(2, 5, 400), rng.normal(150, 15, 400), rng.normal(55, 8, 400))
    assert brighter["status"] == "drift" and brighter["flags"] == ["drift_image_mean"]
    assert brighter["image_mean"]["psi"] > PSI_THRESHOLD
    assert brighter["image_mean"]["mean"] == pytest.approx(150, abs=3)


def test_small_windows_report_psi_without_a_verdict():
    rng = np.random.default_rng(2)
    reference = training_reference(rng.uniform(0, 1, 1000), rng.normal(120, 15, 1000), rng.normal(55, 8, 1000))
    few = drift_report(reference, [0.99] * 10, [200.0] * 10, [10.0] * 10)
    assert few["status"] == "too_few" and few["flags"] == []
    assert few["prob_covid"]["psi"] > PSI_THRESHOLD and few["prob_covid"]["n"] == 10 < MIN_DRIFT_N
    small_reference = training_reference(rng.uniform(0, 1, 40), rng.normal(120, 15, 40), rng.normal(55, 8, 40))
    shifted = drift_report(small_reference, [0.99] * 500, [200.0] * 500, [10.0] * 500)
    assert shifted["status"] == "too_few" and shifted["image_mean"]["psi"] > PSI_THRESHOLD
    empty = drift_report(reference, [], [], [])
    assert empty["status"] == "no_data" and empty["prob_covid"]["psi"] is None


@pytest.mark.parametrize("reference", [None, {}, {"format": 1, "prob_covid": {"cut_points": [0.5]}}])
def test_a_missing_or_malformed_reference_is_unavailable_not_an_error(reference):
    report = drift_report(reference, [0.1, 0.9], [100.0, 120.0], [50.0, 60.0])
    assert report["status"] == "unavailable" and report["flags"] == []
    assert "reference" in report["reason"]
    assert report["prob_covid"] is None


def test_drift_does_not_import_tensorflow():
    code = "import sys, model_store.drift; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
