"""Report rendering: text shared by the offline and nightly reports, PNG plots, and an HTML page that escapes data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_store.metrics import binary_report
from model_store.report import compare_with_baseline, write_report
from model_store.report_render import (
    RocCurve,
    confusion_matrix_lines,
    metrics_lines,
    plot_confusion_matrix,
    plot_roc,
    plot_score_histogram,
    plot_training_curves,
    render_dataset_text,
    render_html_page,
    render_window_text,
)

PNG = b"\x89PNG\r\n\x1a\n"
TRUTH = ["covid", "covid", "covid", "normal", "normal", "normal", "normal"]
SCORES = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4]
BASELINE_SCORES = [0.7, 0.4, 0.6, 0.5, 0.3, 0.2, 0.6]
HOSTILE = '<script>alert("x")</script>'


@pytest.fixture(scope="module")
def performance():
    return binary_report(TRUTH, SCORES, bootstrap=50)


def offline_evaluation(performance) -> dict:
    baseline = binary_report(TRUTH, BASELINE_SCORES, bootstrap=50)
    return {
        "title": "test part", "data_description": "7 images", "metrics": performance,
        "model": {"name": "covid-cxr", "version": "v1", "sha256": "a" * 64},
        "predictions": [{"label": label, "score": score, "baseline_score": base}
                        for label, score, base in zip(TRUTH, SCORES, BASELINE_SCORES, strict=True)],
        "baseline": {"method": "logistic regression", "fitted_on": "train", "metrics": baseline,
                     "comparison": compare_with_baseline(performance, baseline)},
    }


def nightly_metrics(performance) -> dict:
    edges = [round(0.1 * i, 1) for i in range(11)]
    zeros = [0] * 10
    return {
        "performance": performance,
        "population": {"predictions": 7, "labelled": 7, "unlabelled": 0, "conflicting_labels": 0},
        "score_distribution": {"bin_edges": edges, "counts": {
            "all": [1, 1, 1, 1, 1, 0, 1, 0, 1, 1], "covid": [0, 0, 0, 1, 0, 0, 0, 0, 1, 1],
            "normal": [1, 1, 1, 0, 1, 0, 1, 0, 0, 0], "unlabelled": zeros}},
        "rejects": {"files": 8, "by_state": {"predicted": 7, "rejected": 1}, "by_reason": {"rejected": {HOSTILE: 1}}},
        "drift": {"status": "unavailable", "reason": "no training reference", "flags": []},
    }


def test_offline_and_nightly_text_state_the_metrics_and_matrix_the_same_way(performance):
    offline = render_dataset_text(offline_evaluation(performance))
    nightly = render_window_text(nightly_metrics(performance), [], model="covid-cxr v1", level="image",
                                 window="24h: 2026-11-24 02:00 to 2026-11-25 02:00 UTC")
    shared = "\n".join(confusion_matrix_lines(performance) + [""] + metrics_lines(performance))
    assert shared in offline and shared in nightly
    assert "acc: 0.7143 (5/7, 95% CI" in shared and "F1 (covid): 0.6667 (95% bootstrap percentile" in shared
    assert "shortcut check: logistic regression" in offline
    assert f"rejected by reason: {HOSTILE} 1" in nightly and "flags: none" in nightly


def test_every_plot_is_written_as_a_png(performance, tmp_path):
    metrics = nightly_metrics(performance)
    plot_confusion_matrix(performance, tmp_path / "matrix.png", HOSTILE)
    plot_roc(performance, TRUTH, [RocCurve("model", SCORES, performance["roc_auc"])], tmp_path / "roc.png")
    plot_score_histogram(metrics["score_distribution"], performance, tmp_path / "scores.png", "v1")
    plot_training_curves({"loss": [0.7, 0.5], "val_loss": [0.8, 0.6], "accuracy": [0.5, 0.7]},
                         tmp_path / "curves.png")
    for name in ("matrix", "roc", "scores", "curves"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name


def test_the_offline_report_writes_text_json_and_plots(performance, tmp_path):
    history = {"loss": [0.7, 0.5], "val_loss": [0.8, 0.6], "accuracy": [0.5, 0.7], "val_accuracy": [0.4, 0.6]}
    files = write_report(offline_evaluation(performance), tmp_path, history=history, prefix="test_")
    assert set(files) == {"text", "json", "confusion_matrix", "roc_curve", "training_curves"}
    for kind in ("confusion_matrix", "roc_curve", "training_curves"):
        assert Path(files[kind]).name == f"test_{kind}.png" and Path(files[kind]).read_bytes()[:8] == PNG
    assert Path(files["text"]).read_text() == render_dataset_text(offline_evaluation(performance))
    assert json.loads(Path(files["json"]).read_text())["files"] == files


def test_the_page_embeds_its_plots_and_escapes_every_piece_of_data(performance, tmp_path):
    plot_confusion_matrix(performance, tmp_path / "matrix.png", "v1")
    page = render_html_page(f"model {HOSTILE}", performance, [HOSTILE, "label_conflicts"],
                            {'x"><script>y</script>': str(tmp_path / "matrix.png")}, f"</pre>{HOSTILE}<pre>")
    assert "<script" not in page and "</pre><script" not in page
    assert page.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") == 4  # title, heading, flag, text
    assert page.count('src="data:image/png;base64,') == 1 and str(tmp_path) not in page
    assert '<span class="flag">label_conflicts</span>' in page
    assert "<th>accuracy</th><td>0.7143 (5/7, 95% CI" in page


def test_a_page_without_flags_says_so(performance):
    page = render_html_page("v1", performance, [], {}, "report")
    assert '<span class="ok">no flags</span>' in page and "<figure>" not in page
