"""Rendering of every evaluation report as text, PNG plots and an HTML page; no TensorFlow, no database.

Both kinds of report render here, so they state a metric the same way: the offline report of a
labelled set (training's test part, ``covid-cxr models evaluate``; assembled by
:mod:`model_store.report`) and the nightly report of a time window (assembled by the worker's
evaluation job). Their input is a :func:`model_store.metrics.binary_report` plus what the caller
assembled around it. The HTML page comes from ``templates/report.html.j2`` with autoescaping on:
model names, flags and report text are data and never markup.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, Template

from model_store.drift import QUANTITIES
from model_store.metrics import format_proportion

#: Colours of the score histogram: positive class, negative class, unlabelled.
HISTOGRAM_COLOURS = ("#c0392b", "#2874a6", "#aab7b8")
#: Plot resolution of every PNG.
PLOT_DPI = 110

# --- text ------------------------------------------------------------------------------------------


def interval_text(entry: Mapping[str, Any]) -> str:
    """``0.8333 (95% bootstrap percentile 0.5000-1.0000, 1000 resamples)``, or ``undefined``."""
    if entry.get("value") is None:
        return "undefined"
    ci = entry.get("ci")
    text = f"{entry['value']:.4f}"
    if ci:
        text += f" (95% {entry.get('ci_method', 'CI')} {ci[0]:.4f}-{ci[1]:.4f}"
        text += f", {entry['bootstrap_resamples']} resamples)" if "bootstrap_resamples" in entry else ")"
    return text


def _brier_text(report: Mapping[str, Any]) -> str:
    return "undefined" if report["brier"] is None else f"{report['brier']:.4f}"


def metrics_lines(report: Mapping[str, Any], indent: str = "") -> list[str]:
    """The origin's three figures first, then the rest; every proportion with k/n and its Wilson interval."""
    lines = [
        f"acc: {format_proportion(report['accuracy'])}",
        f"sensitivity: {format_proportion(report['sensitivity'])}",
        f"specificity: {format_proportion(report['specificity'])}",
        f"PPV: {format_proportion(report['ppv'])}",
        f"NPV: {format_proportion(report['npv'])}",
        f"F1 ({report['positive']}): {interval_text(report['f1'])}",
        f"ROC AUC: {interval_text(report['roc_auc'])}",
        f"Brier score: {_brier_text(report)}",
        "per class (COVID-Net style):",
    ]
    for name, entry in report["per_class"].items():
        lines.append(f"  {name}: sensitivity {format_proportion(entry['sensitivity'])}; "
                     f"PPV {format_proportion(entry['ppv'])}")
    return [indent + line for line in lines]


def confusion_matrix_lines(report: Mapping[str, Any]) -> list[str]:
    """The confusion matrix as a text table, rows = true class, columns = predicted class."""
    classes = report["classes"]
    width = max(len(name) for name in classes) + 4
    lines = ["confusion matrix (rows = true, columns = predicted):",
             " " * width + "".join(f"{name:>{width}}" for name in classes)]
    for name, row in zip(classes, report["confusion_matrix"], strict=True):
        lines.append(f"{name:>{width}}" + "".join(f"{count:>{width}d}" for count in row))
    return lines


def render_dataset_text(evaluation: Mapping[str, Any]) -> str:
    """The offline report: header, scikit-learn's classification report, confusion matrix, metrics, shortcut check."""
    model_metrics = evaluation["metrics"]
    lines = [f"covid-cxr evaluation: {evaluation['title']}"]
    model = evaluation.get("model") or {}
    if model:
        lines.append(f"model: {model.get('name')} {model.get('version')} (sha256 {model.get('sha256')})")
    lines.append(f"data: {evaluation['data_description']}")
    counts = ", ".join(f"{count} {name}" for name, count in model_metrics["counts"].items())
    lines.append(f"evaluated: {model_metrics['n']} images ({counts}); decision: {model_metrics['positive']} "
                 f"when P({model_metrics['positive']}) >= {model_metrics['threshold']}")
    lines += ["", model_metrics["classification_report"].rstrip(), ""]
    lines += confusion_matrix_lines(model_metrics) + [""]
    lines += metrics_lines(model_metrics)
    baseline = evaluation.get("baseline")
    if baseline:
        lines += ["", f"shortcut check: {baseline['method']}", f"  fitted on: {baseline['fitted_on']}"]
        lines += metrics_lines(baseline["metrics"], indent="  ")
        comparison = baseline["comparison"]
        verdict = "model beats the baseline" if comparison["beats_baseline"] else f"FLAG: model {comparison['flag']}"
        lines += [f"  => {verdict}", f"  rule: {comparison['rule']}"]
    elif evaluation.get("baseline_note"):
        lines += ["", f"shortcut check: {evaluation['baseline_note']}"]
    lines += trust_lines(evaluation)
    for note in evaluation.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def trust_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """Degeneracy, operating point, calibration and subgroup tables, for the reports that have them."""
    lines: list[str] = []
    degenerate = evaluation.get("degenerate")
    if degenerate and degenerate.get("degenerate"):
        lines += ["", "FLAG: DEGENERATE MODEL (activation refused without --force):"]
        lines += [f"  - {reason}" for reason in degenerate["reasons"]]
    operating = evaluation.get("operating_point")
    if operating:
        how = {"fixed": "given", "youden": "Youden's J", "sensitivity": "target sensitivity "
               f"{operating.get('target_sensitivity')}"}[operating["rule"]]
        where = f" on {operating['chosen_on']}" if operating.get("chosen_on") not in (None, "", "given") else ""
        lines += ["", f"operating point: threshold {operating['threshold']:.4f} ({how}{where})"]
        if operating.get("note"):
            lines.append(f"  note: {operating['note']}")
    calibration = evaluation.get("calibration")
    if calibration:
        method = calibration["method"]
        state = (f"calibrated ({method['method']} scaling fitted on {method.get('fitted_on')})"
                 if calibration["calibrated"] else "NOT calibrated (raw softmax output)")
        ece = "undefined" if calibration["ece"] is None else f"{calibration['ece']:.4f}"
        lines += ["", f"calibration: scores {state}; expected calibration error {ece} "
                      f"({calibration['n_bins']} equal-width bins)"]
        lines += ["  bin        n  mean score  fraction positive"]
        for row in calibration["bins"]:
            if row["n"]:
                lines.append(f"  {row['low']:.1f}-{row['high']:.1f} {row['n']:>5d}  {row['mean_score']:>10.3f}  "
                             f"{row['fraction_positive']:>17.3f}")
    for attribute, rows in (evaluation.get("subgroups") or {}).items():
        lines += ["", f"subgroups by {attribute} (n, counts, Wilson intervals; AUC bootstrap interval):"]
        lines += [f"  {row['group']}: n={row['n']} ({', '.join(f'{v} {k}' for k, v in row['counts'].items())}); "
                  f"acc {format_proportion(row['accuracy'])}; sens {format_proportion(row['sensitivity'])}; "
                  f"spec {format_proportion(row['specificity'])}; AUC {interval_text(row['roc_auc'])}"
                  + (f"  FLAG: {row['flag']}" if row["flag"] else "") for row in rows]
    return lines


def render_window_text(metrics: Mapping[str, Any], flags: Sequence[str], *, model: str, level: str,
                       window: str) -> str:
    """The nightly report of one model version, level and window (what ``covid-cxr report`` prints).

    ``metrics`` holds ``performance`` (a binary report), ``population``, ``score_distribution``,
    ``rejects``, ``quality`` (optional) and ``drift``, as the evaluation job assembles them.
    """
    performance, population = metrics["performance"], metrics["population"]
    positive, classes = performance["positive"], performance["classes"]
    lines = [
        f"covid-cxr evaluation: model {model}, {level} level, window {window}",
        f"{'images' if level == 'image' else 'studies'} with predictions: {population['predictions']}; "
        f"labelled: {population['labelled']} "
        f"({', '.join(f'{count} {name}' for name, count in performance['counts'].items())}); "
        f"unlabelled: {population['unlabelled']}; conflicting labels: {population['conflicting_labels']}",
        f"decision: {positive} when P({positive}) >= {performance['threshold']}",
        "",
    ]
    if performance["n"]:
        lines += [performance["classification_report"].rstrip(), ""]
        lines += confusion_matrix_lines(performance) + [""]
    else:
        lines += ["no labelled predictions in this window: every metric is undefined", ""]
    lines += metrics_lines(performance)
    lines += [""] + _distribution_lines(metrics["score_distribution"], positive, classes)
    lines += [""] + _reject_lines(metrics["rejects"])
    if "quality" in metrics:
        lines += [""] + _quality_lines(metrics["quality"], level)
    lines += [""] + _drift_lines(metrics["drift"])
    lines += trust_lines({key: metrics[key] for key in ("calibration", "subgroups") if key in metrics})
    lines += ["", f"flags: {', '.join(flags) if flags else 'none'}"]
    return "\n".join(lines) + "\n"


def _distribution_lines(distribution: Mapping[str, Any], positive: str, classes: Sequence[str]) -> list[str]:
    lines = [f"score distribution, P({positive}) (all / {' / '.join(classes)} / unlabelled):"]
    edges = distribution["bin_edges"]
    for index in range(len(edges) - 1):
        counts = " / ".join(str(distribution["counts"][key][index]) for key in ("all", *classes, "unlabelled"))
        lines.append(f"  {edges[index]:.1f}-{edges[index + 1]:.1f}: {counts}")
    return lines


def _reject_lines(rejects: Mapping[str, Any]) -> list[str]:
    states = ", ".join(f"{state} {count}" for state, count in sorted(rejects["by_state"].items())) or "none"
    lines = [f"files received in the window: {rejects['files']} ({states})"]
    for state, reasons in sorted(rejects["by_reason"].items()):
        by_count = sorted(reasons.items(), key=lambda item: -item[1])
        lines.append(f"  {state} by reason: " + ", ".join(f"{reason} {count}" for reason, count in by_count))
    return lines


def _quality_lines(quality: Mapping[str, Any], level: str) -> list[str]:
    """The quality checks of the window's files, and what became of the flagged cases."""
    where = "studies with a flagged image" if level == "study" else "flagged images"
    fate = "included in" if quality["flagged_included"] else "left out of"
    lines = [f"quality checks: {quality['flagged']} {where} {fate} the metrics"]
    for check, decisions in sorted(quality["by_check"].items()):
        lines.append(f"  {check}: " + ", ".join(f"{decision} {count}" for decision, count in decisions.items()))
    return lines


def _drift_lines(drift: Mapping[str, Any]) -> list[str]:
    if drift.get("reason"):
        how = f" ({drift['reason']})"
    else:
        how = f" (PSI; flag above {drift['threshold']} when window and reference each hold {drift['min_n']}+ values)"
    lines = [f"drift against the training reference: {drift['status']}{how}"]
    for name in QUANTITIES:
        entry = drift.get(name)
        if entry:
            psi = "n/a" if entry["psi"] is None else f"{entry['psi']:.3f}"
            mean = "n/a" if entry["mean"] is None else f"{entry['mean']:.3f}"
            lines.append(f"  {name}: PSI {psi} ({entry['status']}; n {entry['n']}, mean {mean}; "
                         f"reference n {entry['reference_n']}, mean {entry['reference_mean']:.3f})")
    return lines


# --- plots -----------------------------------------------------------------------------------------


class RocCurve(NamedTuple):
    """One classifier's scores on the labelled cases, with its ROC AUC entry of a binary report."""

    label: str
    scores: Sequence[float] | np.ndarray
    roc_auc: Mapping[str, Any]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)


def plot_confusion_matrix(report: Mapping[str, Any], path: Path, title: str) -> None:
    """Seaborn heatmap of the confusion matrix, titled with the accuracy and its Wilson interval."""
    import seaborn as sns

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.6, 4))
    sns.heatmap(np.asarray(report["confusion_matrix"]), annot=True, fmt="d", cmap="Blues", cbar=False,
                xticklabels=report["classes"], yticklabels=report["classes"], ax=axes, annot_kws={"size": 14})
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = report["accuracy"]
    ci = accuracy["ci"]
    subtitle = (f"acc {accuracy['value']:.2f} ({accuracy['k']}/{accuracy['n']}, 95% CI {ci[0]:.2f}-{ci[1]:.2f})"
                if ci else "")
    axes.set_title(f"{title}\n{subtitle}", fontsize=9)
    _save(plt, figure, path)


def plot_reliability(calibration: Mapping[str, Any], path: Path) -> None:
    """Reliability diagram: observed fraction of positives against the mean score per bin (sized by n)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.6, 4.4))
    rows = [row for row in calibration["bins"] if row["n"]]
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    if rows:
        axes.plot([row["mean_score"] for row in rows], [row["fraction_positive"] for row in rows], marker="o",
                  color=HISTOGRAM_COLOURS[0], label="model")
        for row in rows:
            axes.annotate(f"n={row['n']}", (row["mean_score"], row["fraction_positive"]), fontsize=7,
                          textcoords="offset points", xytext=(3, -9))
    ece = calibration["ece"]
    state = "calibrated" if calibration["calibrated"] else "not calibrated"
    axes.set_title(f"reliability ({state}), ECE {'n/a' if ece is None else f'{ece:.3f}'}", fontsize=9)
    axes.set_xlabel("mean predicted P(positive) in bin")
    axes.set_ylabel("observed fraction positive")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.legend(loc="upper left", fontsize=8)
    _save(plt, figure, path)


def plot_roc(report: Mapping[str, Any], truth: Sequence[str], curves: Sequence[RocCurve], path: Path) -> None:
    """ROC curves of ``curves`` against the true class names ``truth``; a curve with an undefined AUC is left out."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    positive = report["positive"]
    is_positive = np.array([label == positive for label in truth], dtype=int)
    figure, axes = plt.subplots(figsize=(4.6, 4.4))
    for curve in curves:
        auc = curve.roc_auc
        if auc["value"] is None:
            continue
        fpr, tpr, _ = roc_curve(is_positive, np.asarray(curve.scores, dtype=float))
        ci = auc["ci"]
        interval = f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else ""
        axes.plot(fpr, tpr, drawstyle="steps-post", label=f"{curve.label}: AUC {auc['value']:.3f}{interval}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("1 - specificity (false positive rate)")
    axes.set_ylabel("sensitivity (true positive rate)")
    axes.set_title(f"ROC, positive = {positive}, n = {report['n']}", fontsize=9)
    axes.legend(loc="lower right", fontsize=8)
    _save(plt, figure, path)


def plot_score_histogram(distribution: Mapping[str, Any], report: Mapping[str, Any], path: Path,
                         title: str) -> None:
    """Stacked histogram of the predicted probability by true class (and unlabelled), with the threshold."""
    plt = _pyplot()
    edges = np.array(distribution["bin_edges"])
    figure, axes = plt.subplots(figsize=(5.2, 3.6))
    bottom = np.zeros(len(edges) - 1)
    stacks = [(f"true {name}", name) for name in report["classes"]] + [("unlabelled", "unlabelled")]
    for (legend, key), colour in zip(stacks, HISTOGRAM_COLOURS, strict=True):
        counts = np.array(distribution["counts"][key])
        axes.bar(edges[:-1], counts, width=np.diff(edges), bottom=bottom, align="edge", color=colour,
                 edgecolor="white", label=legend)
        bottom += counts
    axes.axvline(report["threshold"], color="black", linestyle="--", linewidth=1, label="threshold")
    axes.set_xlim(0, 1)
    axes.set_xlabel(f"predicted P({report['positive']})")
    axes.set_ylabel("count")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    _save(plt, figure, path)


def plot_training_curves(history: Mapping[str, Sequence[float]], path: Path) -> None:
    """Loss and accuracy per epoch, training and validation side by side."""
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values:
                axes.plot(epochs, values, style, marker=".", label=("validation " if prefix else "train ") + metric)
        axes.set_xlabel("epoch")
        axes.set_title(metric, fontsize=9)
        axes.legend(fontsize=8)
    _save(plt, figure, path)


# --- the HTML page ---------------------------------------------------------------------------------


@cache
def _page_template() -> Template:
    environment = Environment(loader=PackageLoader("model_store"), autoescape=True, undefined=StrictUndefined,
                              keep_trailing_newline=True)
    return environment.get_template("report.html.j2")


def _headline_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = [(label, format_proportion(report[key])) for label, key in (
        ("accuracy", "accuracy"), ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("PPV", "ppv"),
        ("NPV", "npv"))]
    rows += [("F1", interval_text(report["f1"])), ("ROC AUC", interval_text(report["roc_auc"])),
             ("Brier score", _brier_text(report))]
    return rows


def render_html_page(title: str, report: Mapping[str, Any], flags: Sequence[str], plots: Mapping[str, str],
                     text: str) -> str:
    """One self-contained page: headline table, flags, the PNGs in ``plots`` embedded as data URIs, the text report.

    Nothing on the page points outside it, so it can be mailed or archived alone.
    """
    figures = [{"name": name, "caption": name.replace("_", " "), "src": _data_uri(Path(path))}
               for name, path in plots.items()]
    return _page_template().render(title=title, rows=_headline_rows(report), flags=list(flags), figures=figures,
                                   text=text)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
