"""Subgroup tables against a hand computation on a small fixture, the flag, and age bands."""

from __future__ import annotations

import pytest

from ingest.metadata import age_band
from model_store.dataset import Dataset, Item, group_attributes
from model_store.metrics import binary_report
from model_store.subgroups import HEADER_ATTRIBUTES, MISSING, header_attributes, subgroup_metrics

# origin A: 3 covid (scores 0.9, 0.8, 0.3) and 3 normal (0.1, 0.2, 0.6) -> separable apart from one pair each.
# origin B: 2 covid (0.2, 0.1) and 2 normal (0.9, 0.8) -> the model is inverted there.
LABELS = ["covid", "covid", "covid", "normal", "normal", "normal", "covid", "covid", "normal", "normal"]
SCORES = [0.9, 0.8, 0.3, 0.1, 0.2, 0.6, 0.2, 0.1, 0.9, 0.8]
ORIGIN = ["A"] * 6 + ["B"] * 4
SEX = ["F", "M", None, "F", "M", "", "F", "M", "F", "M"]


def test_subgroup_rows_match_a_hand_computation() -> None:
    overall = binary_report(LABELS, SCORES, threshold=0.5, seed=1)
    tables = subgroup_metrics(LABELS, SCORES, {"origin": ORIGIN, "sex": SEX}, overall, threshold=0.5, seed=1)
    a, b = tables["origin"]
    assert a["group"] == "A" and a["n"] == 6 and a["counts"] == {"covid": 3, "normal": 3}
    # A at 0.5: covid 0.9, 0.8 positive (TP 2), 0.3 missed (FN 1); normal 0.6 positive (FP 1), TN 2.
    assert (a["sensitivity"]["k"], a["sensitivity"]["n"]) == (2, 3)
    assert (a["specificity"]["k"], a["specificity"]["n"]) == (2, 3)
    assert (a["accuracy"]["k"], a["accuracy"]["n"]) == (4, 6)
    # AUC of A: of the 9 covid/normal pairs, the covid score is higher in 8 (0.3 < 0.6 is the one miss).
    assert a["roc_auc"]["value"] == pytest.approx(8 / 9)
    assert a["accuracy"]["ci"][0] < 4 / 6 < a["accuracy"]["ci"][1]  # never a bare number: Wilson interval
    # B: inverted, AUC 0, every case wrong.
    assert b["n"] == 4 and b["roc_auc"]["value"] == 0.0 and b["accuracy"]["k"] == 0
    assert b["flag"] == "AUC interval entirely below the overall one" and a["flag"] is None
    # Missing values form their own subgroup; a one-class subgroup has an undefined AUC, not 0.
    groups = {row["group"]: row for row in tables["sex"]}
    assert set(groups) == {"F", "M", MISSING}
    assert groups[MISSING]["n"] == 2 and groups[MISSING]["roc_auc"]["value"] is not None
    assert groups["F"]["n"] == 4


def test_a_one_class_subgroup_has_no_auc_and_no_flag() -> None:
    overall = binary_report(LABELS, SCORES, threshold=0.5, seed=1)
    tables = subgroup_metrics(LABELS, SCORES, {"label": LABELS}, overall, threshold=0.5, seed=1)
    for row in tables["label"]:
        assert row["roc_auc"]["value"] is None and row["flag"] is None


@pytest.mark.parametrize(("age", "band"), [("66", "60-69"), ("066Y", "60-69"), ("9", "0-9"), ("003M", "0-9"),
                                           ("70", "70-79"), ("", None), ("n/a", None), ("200", None)])
def test_age_bands_are_decades(age: str, band: str | None) -> None:
    assert age_band(age) == band


def test_group_by_reads_csv_columns_and_bands_ages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    items = [Item(tmp_path / f"{i}.png", "covid", str(i), f"{i}.png", {"origin_dataset": o, "age": a})
             for i, (o, a) in enumerate([("x", "34"), ("y", "71"), ("x", "")])]
    dataset = Dataset(items, {}, ("covid", "normal"), True)
    assert group_attributes(dataset, ["origin_dataset", "age"]) == {"origin_dataset": ["x", "y", "x"],
                                                                    "age_band": ["30-39", "70-79", None]}
    from covid_cxr.errors import UsageError

    with pytest.raises(UsageError, match="no such column"):
        group_attributes(dataset, ["hospital"])


def test_header_facts_get_a_table_only_where_some_image_has_them() -> None:
    png: dict[str, str | None] = {}
    dicom = {name: None for name in HEADER_ATTRIBUTES} | {"manufacturer": "ACME", "modality": "DX", "patient_sex": ""}
    assert header_attributes([png, png]) == {}  # a PNG/JPEG-only set has no header facts, and gets no table
    # A mixed set: the PNG lacks the attribute (a missing value, grouped as such); an empty value is no value.
    assert header_attributes([dicom, png]) == {"manufacturer": ["ACME", None], "modality": ["DX", None]}


def test_offline_and_nightly_reports_group_by_the_same_header_facts() -> None:
    from worker.evaluation_window import IMAGE_SUBGROUP_ATTRIBUTES, INSTANCE_SUBGROUP_ATTRIBUTES

    assert HEADER_ATTRIBUTES == IMAGE_SUBGROUP_ATTRIBUTES + INSTANCE_SUBGROUP_ATTRIBUTES
