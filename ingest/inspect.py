"""What ``covid-cxr inspect`` shows: one file read as the service reads it, as a JSON-ready report or text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covid_cxr.errors import CovidCxrError
from covid_cxr.reasons import Reason
from ingest.metadata import sop_class_name
from ingest.normalized_png import encode_png
from ingest.reader import ReaderPolicy, ReadResult, read_radiograph


def inspect_file(path: Path, policy: ReaderPolicy, *, png: Path | None = None) -> dict[str, Any]:
    """Read ``path`` with :func:`~ingest.reader.read_radiograph`; write the 224x224 image to ``png`` if accepted.

    Returns :meth:`ReadResult.to_dict` plus ``file`` and ``png`` (the path written, or
    ``None`` when nothing was written because the file was rejected or no path was asked
    for). Raises ``OSError`` when ``path`` cannot be read and :class:`CovidCxrError` when
    the PNG cannot be written.
    """
    result = read_radiograph(path, policy)
    written = _write_png(result, png) if png is not None else None
    return {"file": str(path), **result.to_dict(), "png": None if written is None else str(written)}


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned ``label  value`` lines for a terminal."""
    meta = report.get("metadata") or {}
    lines: list[tuple[str, str]] = [("file", report["file"]), ("sha256", report["sha256"])]
    if report["accepted"]:
        lines.append(("decision", "ACCEPTED"))
    else:
        reason = Reason.lookup(report["reason"])
        lines.append(("decision", f"REJECTED {report['reason']}: {report['message']}"))
        if reason is not None:
            lines.append(("", reason.description))
    if meta:
        sop_class = meta.get("sop_class_uid")
        lines += [
            ("SOP class", f"{sop_class_name(sop_class) or '?'} ({sop_class or 'missing'})"),
            ("modality", _shown(meta.get("modality"))),
            ("view position", _shown(meta.get("view_position"))),
            ("body part", _shown(meta.get("body_part_examined"))),
            ("image", f"{_shown(meta.get('rows'))} x {_shown(meta.get('columns'))}, "
                      f"{_shown(meta.get('bits_stored'))} bits stored, "
                      f"{_shown(meta.get('photometric_interpretation'))}, "
                      f"{meta.get('number_of_frames') or 1} frame(s)"),
            ("transfer syntax", _syntax(meta.get("transfer_syntax_uid"))),
            ("manufacturer", _shown(meta.get("manufacturer"))),
            ("study date", _shown(meta.get("study_date"))),
            ("accession", _shown(meta.get("accession_number"))),
            ("study UID", _shown(meta.get("study_instance_uid"))),
            ("series UID", _shown(meta.get("series_instance_uid"))),
            ("instance UID", _shown(meta.get("sop_instance_uid"))),
            ("patient", f"pseudonym {meta['patient_pseudonym']}" if meta.get("patient_pseudonym") else "-"),
        ]
    else:
        lines.append(("header", "not readable"))
    lines += [
        ("steps", " > ".join(report["steps"]) or "-"),
        ("flags", ", ".join(report["flags"]) or "-"),
        *((f"qc {check['check']}", _quality(check)) for check in report.get("quality", [])),
        ("preprocessing", report["preprocessing_version"]),
    ]
    if report.get("png"):
        lines.append(("png", f"{report['png']} (what the model sees)"))
    if report.get("explain"):
        explained = report["explain"]
        lines.append(("explain", f"{explained['explain']} (Grad-CAM at {explained['layer']} of {explained['model']}; "
                                 f"P(covid) {explained['score']:.4f}, threshold {explained['threshold']})"))
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in lines)


def _quality(check: dict[str, Any]) -> str:
    """One check's outcome: ``decision finding, score S: action (evidence) [version]``."""
    text = check["decision"]
    if check["finding"]:
        text += f" {check['finding']}"
    if check["score"] is not None:
        text += f", score {check['score']:.2f}"
    if check["finding"] and not check["confident"]:
        text += " (not confident)"
    if check["action"]:
        text += f": {check['action']}"
    if check["evidence"]:
        text += f" ({check['evidence']})"
    return f"{text} [{check['version']}]"


def _write_png(result: ReadResult, png: Path) -> Path | None:
    if not result.accepted:
        return None
    try:
        encoded = encode_png(result.image)
    except ValueError as exc:
        raise CovidCxrError(f"cannot encode the image as PNG for {png}", reason=Reason.PNG_NOT_WRITTEN) from exc
    try:
        png.write_bytes(encoded)
    except OSError as exc:
        raise CovidCxrError(f"cannot write {png}: {exc.strerror or exc}", reason=Reason.PNG_NOT_WRITTEN) from exc
    return png


def _shown(value: Any) -> str:
    return "-" if value is None else str(value)


def _syntax(uid: str | None) -> str:
    if not uid:
        return "-"
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid
