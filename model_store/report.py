"""The evaluation report as text, JSON and PNG plots (confusion-matrix heatmap, ROC curve, training curves); no TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from model_store.metrics import format_proportion

SHORTCUT_RULE = ("the model beats the shortcut baseline when its accuracy is higher AND its ROC AUC is higher "
                 "(point estimates; overlapping intervals mean the difference is not established)")


def compare_with_baseline(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Whether the model beats the thumbnail baseline (see :data:`SHORTCUT_RULE`), with the differences."""
    accuracy, base_accuracy = model["accuracy"]["value"], baseline["accuracy"]["value"]
    auc, base_auc = model["roc_auc"]["value"], baseline["roc_auc"]["value"]
    beats_accuracy = accuracy is not None and base_accuracy is not None and accuracy > base_accuracy
    beats_auc = auc is not None and base_auc is not None and auc > base_auc
    beats = beats_accuracy and beats_auc
    return {
        "rule": SHORTCUT_RULE,
        "beats_baseline": beats,
        "accuracy_difference": None if accuracy is None or base_accuracy is None else accuracy - base_accuracy,
        "auc_difference": None if auc is None or base_auc is None else auc - base_auc,
        "flag": None if beats else "DOES NOT BEAT the 32x32 thumbnail baseline: its accuracy may rest on shortcuts",
    }


def _matrix_text(report: dict[str, Any]) -> list[str]:
    classes = report["classes"]
    width = max(8, *(len(name) + 2 for name in classes))
    lines = ["confusion matrix (rows = true class, columns = predicted class):",
             " " * width + "".join(f"{name:>{width}}" for name in classes)]
    for name, row in zip(classes, report["confusion_matrix"], strict=False):
        lines.append(f"{name:>{width}}" + "".join(f"{count:>{width}d}" for count in row))
    return lines


def _interval(entry: dict[str, Any]) -> str:
    if entry.get("value") is None:
        return "undefined"
    ci = entry.get("ci")
    text = f"{entry['value']:.4f}"
    if ci:
        text += f" (95% {entry.get('ci_method', 'CI')} {ci[0]:.4f}-{ci[1]:.4f}"
        text += f", {entry['bootstrap_resamples']} resamples)" if "bootstrap_resamples" in entry else ")"
    return text


def metrics_lines(report: dict[str, Any], indent: str = "") -> list[str]:
    """The origin's three figures first, then the rest; every proportion with k/n and its Wilson interval."""
    positive = report["positive"]
    lines = [
        f"acc: {format_proportion(report['accuracy'])}",
        f"sensitivity: {format_proportion(report['sensitivity'])}",
        f"specificity: {format_proportion(report['specificity'])}",
        f"PPV: {format_proportion(report['ppv'])}",
        f"NPV: {format_proportion(report['npv'])}",
        f"F1 ({positive}): {_interval(report['f1'])}",
        f"ROC AUC: {_interval(report['roc_auc'])}",
        f"Brier score: {'undefined' if report['brier'] is None else format(report['brier'], '.4f')}",
        "per class (COVID-Net style):",
    ]
    for name, entry in report["per_class"].items():
        lines.append(f"  {name}: sensitivity {format_proportion(entry['sensitivity'])}; "
                     f"PPV {format_proportion(entry['ppv'])}")
    return [indent + line for line in lines]


def render_text(evaluation: dict[str, Any]) -> str:
    """The plain-text report: header, scikit-learn's classification report, confusion matrix, metrics, shortcut check."""
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
    lines += _matrix_text(model_metrics) + [""]
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
    for note in evaluation.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def write_report(evaluation: dict[str, Any], out_dir: Path, history: dict[str, list[float]] | None = None,
                 prefix: str = "") -> dict[str, str]:
    """Write ``report.txt``, ``report.json``, ``confusion_matrix.png``, ``roc_curve.png`` (and ``training_curves.png``).

    ``evaluation`` needs ``title``, ``data_description``, ``metrics`` (a :func:`model_store.metrics.binary_report`),
    ``predictions`` (``label``, ``score`` and optionally ``baseline_score`` per image) and optionally
    ``baseline`` and ``model``. Returns the written paths by kind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "text": out_dir / f"{prefix}report.txt",
        "json": out_dir / f"{prefix}report.json",
        "confusion_matrix": out_dir / f"{prefix}confusion_matrix.png",
        "roc_curve": out_dir / f"{prefix}roc_curve.png",
    }
    paths["text"].write_text(render_text(evaluation))
    plot_confusion_matrix(evaluation["metrics"], paths["confusion_matrix"], evaluation["title"])
    plot_roc(evaluation, paths["roc_curve"])
    if history:
        paths["training_curves"] = out_dir / f"{prefix}training_curves.png"
        plot_training_curves(history, paths["training_curves"])
    written = {kind: str(path) for kind, path in paths.items()}
    paths["json"].write_text(json.dumps({**evaluation, "files": written}, indent=2, default=_plain) + "\n")
    return written


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(report: dict[str, Any], path: Path, title: str) -> None:
    import seaborn as sns

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.6, 4))
    sns.heatmap(np.asarray(report["confusion_matrix"]), annot=True, fmt="d", cmap="Blues", cbar=False,
                xticklabels=report["classes"], yticklabels=report["classes"], ax=axes, annot_kws={"size": 14})
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = report["accuracy"]
    ci = accuracy["ci"]
    subtitle = f"acc {accuracy['value']:.2f} ({accuracy['k']}/{accuracy['n']}, 95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
    axes.set_title(f"{title}\n{subtitle}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_roc(evaluation: dict[str, Any], path: Path) -> None:
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    report = evaluation["metrics"]
    positive = report["positive"]
    truth = np.array([row["label"] == positive for row in evaluation["predictions"]], dtype=int)
    figure, axes = plt.subplots(figsize=(4.6, 4.4))
    curves = [("model", "score", report)]
    if evaluation.get("baseline"):
        curves.append(("32x32 baseline", "baseline_score", evaluation["baseline"]["metrics"]))
    for label, key, metrics in curves:
        scores = np.array([row[key] for row in evaluation["predictions"]], dtype=float)
        auc = metrics["roc_auc"]
        if auc["value"] is None:
            continue
        fpr, tpr, _ = roc_curve(truth, scores)
        ci = auc["ci"]
        interval = f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else ""
        axes.plot(fpr, tpr, drawstyle="steps-post", label=f"{label}: AUC {auc['value']:.3f}{interval}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("1 - specificity (false positive rate)")
    axes.set_ylabel("sensitivity (true positive rate)")
    axes.set_title(f"ROC, positive = {positive}, n = {report['n']}", fontsize=9)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_training_curves(history: dict[str, list[float]], path: Path) -> None:
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
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
