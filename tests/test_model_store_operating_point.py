"""The decision threshold chosen on labelled scores: Youden's J and a target sensitivity."""

from __future__ import annotations

import pytest

from model_store.operating_point import choose_threshold

TRUTH = [True, True, True, True, False, False, False, False]
SCORES = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]


def test_youden_maximises_sensitivity_plus_specificity() -> None:
    chosen = choose_threshold(TRUTH, SCORES, "youden", chosen_on="validation")
    # at 0.6: sens 3/4, spec 3/4 (J 0.5); at 0.8: 2/4, 4/4 (J 0.5, first found is the higher threshold)
    assert chosen["threshold"] in (0.6, 0.8)
    assert chosen["sensitivity"] - (1 - chosen["specificity"]) == pytest.approx(0.5)
    assert chosen["chosen_on"] == "validation"


def test_target_sensitivity_takes_the_highest_threshold_reaching_it() -> None:
    chosen = choose_threshold(TRUTH, SCORES, "sensitivity", target_sensitivity=0.9)
    assert chosen["threshold"] == 0.3 and chosen["sensitivity"] == 1.0 and chosen["specificity"] == 0.5
    assert choose_threshold(TRUTH, SCORES, "sensitivity", target_sensitivity=0.75)["threshold"] == 0.6


def test_fixed_and_one_class_sets_keep_the_given_threshold() -> None:
    assert choose_threshold(TRUTH, SCORES, "fixed", fixed=0.4)["threshold"] == 0.4
    kept = choose_threshold([True, True], [0.2, 0.9], "youden", fixed=0.5)
    assert kept["threshold"] == 0.5 and "lacks a class" in kept["note"]
    with pytest.raises(ValueError):
        choose_threshold(TRUTH, SCORES, "sensitivity")
