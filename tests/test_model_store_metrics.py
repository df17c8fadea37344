"""Metrics against hand-computed values, including the origin's 10-image test set (0.90 / 0.80 / 1.00)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_store.metrics import binary_report, format_proportion, wilson_interval

Z95 = 1.959963984540054


def wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# The origin's test set: 5 covid, 5 "normal"; one covid missed -> acc 9/10, sens 4/5, spec 5/5.
ORIGIN_TRUE = ["covid"] * 5 + ["normal"] * 5
ORIGIN_SCORE = [0.95, 0.90, 0.80, 0.70, 0.30, 0.20, 0.10, 0.05, 0.40, 0.15]


def test_origin_ten_image_case() -> None:
    report = binary_report(ORIGIN_TRUE, ORIGIN_SCORE)
    assert report["confusion_matrix"] == [[4, 1], [0, 5]]
    assert (report["tp"], report["fn"], report["fp"], report["tn"]) == (4, 1, 0, 5)
    assert report["accuracy"]["value"] == pytest.approx(0.90)
    assert report["sensitivity"]["value"] == pytest.approx(0.80)
    assert report["specificity"]["value"] == pytest.approx(1.00)
    assert (report["accuracy"]["k"], report["accuracy"]["n"]) == (9, 10)
    assert (report["sensitivity"]["k"], report["sensitivity"]["n"]) == (4, 5)
    assert (report["specificity"]["k"], report["specificity"]["n"]) == (5, 5)
    # The intervals quoted in issue 3: roughly 0.60-0.98, 0.38-0.96, 0.57-1.00.
    assert report["accuracy"]["ci"] == pytest.approx((0.5958, 0.9821), abs=1e-4)
    assert report["sensitivity"]["ci"] == pytest.approx((0.3755, 0.9638), abs=1e-4)
    assert report["specificity"]["ci"] == pytest.approx((0.5655, 1.0), abs=1e-4)
    assert report["ppv"]["value"] == 1.0 and (report["ppv"]["k"], report["ppv"]["n"]) == (4, 4)
    assert report["npv"]["value"] == pytest.approx(5 / 6)
    assert report["f1"]["value"] == pytest.approx(2 * 4 / (2 * 4 + 1))
    # AUC by hand: of the 25 (covid, normal) pairs only (0.30 covid, 0.40 normal) is ranked wrongly.
    assert report["roc_auc"]["value"] == pytest.approx(24 / 25)
    low, high = report["roc_auc"]["ci"]
    assert low <= 24 / 25 <= high <= 1.0
    brier = np.mean((np.array(ORIGIN_SCORE) - np.array([1] * 5 + [0] * 5)) ** 2)
    assert report["brier"] == pytest.approx(brier)
    assert report["per_class"]["covid"]["sensitivity"]["value"] == pytest.approx(0.8)
    assert report["per_class"]["normal"]["sensitivity"]["value"] == pytest.approx(1.0)
    assert report["per_class"]["normal"]["ppv"]["value"] == pytest.approx(5 / 6)
    assert "covid" in report["classification_report"] and "0.8000" in report["classification_report"]


def test_per_class_figures_agree_with_scikit_learn() -> None:
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(3)
    truth = rng.choice(["covid", "normal"], 57)
    scores = rng.random(57)
    report = binary_report(truth, scores, threshold=0.4)
    predicted = np.where(scores >= 0.4, "covid", "normal")
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, labels=["covid", "normal"])
    assert report["per_class"]["covid"]["ppv"]["value"] == pytest.approx(precision[0])
    assert report["per_class"]["normal"]["ppv"]["value"] == pytest.approx(precision[1])
    assert report["per_class"]["covid"]["sensitivity"]["value"] == pytest.approx(recall[0])
    assert report["specificity"]["value"] == pytest.approx(recall[1])
    assert report["f1"]["value"] == pytest.approx(f1[0])


@pytest.mark.parametrize(("k", "n"), [(9, 10), (4, 5), (5, 5), (0, 5), (1, 1), (37, 44), (0, 1)])
def test_wilson_matches_the_formula(k: int, n: int) -> None:
    low, high = wilson_interval(k, n)
    expected_low, expected_high = wilson_by_hand(k, n)
    assert low == pytest.approx(max(0.0, expected_low), abs=1e-9)
    assert high == pytest.approx(min(1.0, expected_high), abs=1e-9)


def test_wilson_is_undefined_for_zero_cases_and_rejects_nonsense() -> None:
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_estimate(pair: tuple[int, int]) -> None:
    k, n = pair
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_undefined_metrics_are_none_not_zero() -> None:
    report = binary_report(["normal", "normal", "normal"], [0.1, 0.2, 0.7])
    assert report["sensitivity"] == {"k": 0, "n": 0, "value": None, "ci": None}
    assert report["specificity"]["value"] == pytest.approx(2 / 3)
    assert report["roc_auc"]["value"] is None and report["roc_auc"]["ci"] is None
    assert report["f1"]["value"] == 0.0  # one false positive, no true positive: defined and zero


def test_empty_input_gives_an_all_undefined_report() -> None:
    report = binary_report([], [])
    assert report["n"] == 0
    assert report["accuracy"]["value"] is None and report["brier"] is None and report["roc_auc"]["value"] is None


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="pneumonia"):
        binary_report(["covid", "pneumonia"], [0.2, 0.3])
    with pytest.raises(ValueError, match="equally long"):
        binary_report(["covid"], [0.2, 0.3])
    with pytest.raises(ValueError, match="probabilities"):
        binary_report(["covid"], [1.2])


def test_threshold_moves_the_decision() -> None:
    strict = binary_report(ORIGIN_TRUE, ORIGIN_SCORE, threshold=0.25)
    assert strict["sensitivity"]["value"] == 1.0 and strict["specificity"]["value"] == pytest.approx(0.8)


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    first = binary_report(ORIGIN_TRUE, ORIGIN_SCORE, seed=5)
    second = binary_report(ORIGIN_TRUE, ORIGIN_SCORE, seed=5)
    assert first["roc_auc"]["ci"] == second["roc_auc"]["ci"]
    assert binary_report(ORIGIN_TRUE, ORIGIN_SCORE, bootstrap=0)["roc_auc"]["ci"] is None


def test_format_proportion() -> None:
    report = binary_report(ORIGIN_TRUE, ORIGIN_SCORE)
    assert format_proportion(report["accuracy"]) == "0.9000 (9/10, 95% CI 0.5958-0.9821)"
    assert format_proportion({"k": 0, "n": 0, "value": None, "ci": None}) == "undefined (0/0)"


def test_metrics_module_does_not_import_tensorflow() -> None:
    code = "import sys, model_store.metrics; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_degeneracy_detects_one_class_predictions_and_chance_balanced_accuracy() -> None:
    from model_store.metrics import degeneracy

    labels = ["covid", "covid", "normal", "normal", "normal"]
    all_normal = binary_report(labels, [0.1, 0.2, 0.1, 0.3, 0.2], threshold=0.5, bootstrap=0)
    reasons = degeneracy(all_normal, "test")
    assert any("predicts 'normal' for all 5 images of the test part" in reason for reason in reasons)
    assert any("balanced accuracy 0.500" in reason for reason in reasons)
    chance = binary_report(labels, [0.9, 0.1, 0.9, 0.1, 0.1], threshold=0.5, bootstrap=0)  # sens 1/2, spec 2/3
    assert degeneracy(chance, "validation") == []  # balanced 0.583: above chance + margin
    inverted = binary_report(labels, [0.1, 0.1, 0.9, 0.1, 0.1], threshold=0.5, bootstrap=0)
    assert any("at chance" in reason for reason in degeneracy(inverted, "validation"))
    good = binary_report(labels, [0.9, 0.8, 0.1, 0.2, 0.3], threshold=0.5, bootstrap=0)
    assert degeneracy(good, "test") == []


def test_the_bootstrap_auc_equals_scikit_learns_on_every_resample() -> None:
    """The rank statistic the bootstrap uses gives scikit-learn's ROC AUC, ties included."""
    from sklearn.metrics import roc_auc_score

    from model_store.metrics import _rank_auc

    rng = np.random.default_rng(7)
    for n in (2, 5, 40, 300):
        for _ in range(50):
            truth = rng.integers(0, 2, n).astype(bool)
            if truth.all() or not truth.any():
                continue
            scores = np.round(rng.random(n), 1)  # many ties
            assert _rank_auc(truth, scores) == pytest.approx(float(roc_auc_score(truth, scores)), abs=1e-12)
