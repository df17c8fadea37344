"""Ground-truth labels from a CSV file: decode and validate line by line, then upsert into ``labels``.

A labels file has a header with ``label``, ``source``, ``date`` and at least one key column named
by its DICOM keyword: ``StudyInstanceUID``, ``SOPInstanceUID`` or ``AccessionNumber`` (case, spaces
and underscores are ignored, so ``study_instance_uid`` works too). Each row gives exactly one key.
Problems in a row are reported with its line number and the row is skipped; valid rows still land.
Only a file that cannot be read at all (no usable header) raises :class:`LabelImportError`.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from covid_cxr.constants import CLASS_NAMES
from covid_cxr.errors import LabelImportError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import GroundTruthLabel, Instance, LabelChange, Study
from db.session import session_scope

#: Key columns by normalized header name -> ``labels.key_type``, most specific first.
KEY_COLUMNS: dict[str, str] = {
    "sopinstanceuid": "sop_instance_uid",
    "studyinstanceuid": "study_instance_uid",
    "accessionnumber": "accession_number",
}
#: The DICOM keyword of each key type, for messages.
KEY_KEYWORDS: dict[str, str] = {
    "sop_instance_uid": "SOPInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "accession_number": "AccessionNumber",
}
VALUE_COLUMNS: dict[str, str] = {"label": "label", "source": "source", "date": "date", "labeldate": "date"}

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MAX_KEY = 64  # labels.key_value / DICOM UI
_MAX_SOURCE = 64
_QUERY_CHUNK = 500

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class LineProblem:
    """Something wrong on one line of a labels file; errors skip the row, warnings do not."""

    line: int
    reason: Reason
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"line {self.line}: {self.severity}: {self.message} [{self.reason}]"


@dataclass(frozen=True)
class LabelRow:
    """One valid row of a labels file."""

    line: int
    key_type: str
    key_value: str
    label: str
    source: str
    label_date: str


@dataclass
class LabelImportResult:
    """What an import did: rows read, what happened to the valid ones, and every problem by line."""

    file_name: str
    rows: int = 0
    added: int = 0
    changed: int = 0
    updated: int = 0
    unchanged: int = 0
    problems: list[LineProblem] = field(default_factory=list)

    @property
    def errors(self) -> list[LineProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[LineProblem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file_name": self.file_name,
            "rows": self.rows,
            "added": self.added,
            "changed": self.changed,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "problems": [asdict(p) for p in sorted(self.problems, key=lambda p: p.line)],
        }


def _normalize_header(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def decode_lines(data: bytes) -> tuple[list[tuple[int, str]], list[LineProblem]]:
    """Split raw bytes into ``(line number, text)`` pairs, decoding each line on its own.

    UTF-8 (with or without BOM) is expected; a line that is not valid UTF-8 is decoded as
    Windows-1252 (a superset of Latin-1's printable characters, what spreadsheet exports use)
    with a warning, so a file that mixes encodings loads. A line that is neither, or that holds
    control bytes (a binary file), is an error. A UTF-16 file (with BOM) is decoded whole.
    """
    problems: list[LineProblem] = []
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return list(enumerate(data.decode("utf-16").splitlines(), start=1)), problems
        except UnicodeDecodeError as exc:
            raise LabelImportError(f"the file starts with a UTF-16 byte-order mark but is not UTF-16: {exc}") from exc
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:
                problems.append(LineProblem(number, Reason.UNDECODABLE,
                                            "bytes are neither UTF-8 nor Windows-1252/Latin-1"))
                continue
            problems.append(LineProblem(number, Reason.NOT_UTF8, "not valid UTF-8; decoded as Windows-1252/Latin-1",
                                        severity="warning"))
        if _CONTROL.search(text):
            problems.append(LineProblem(number, Reason.UNDECODABLE, "contains control bytes (not a text CSV line)"))
            continue
        lines.append((number, text))
    return lines, problems


def _parse_header(number: int, text: str) -> tuple[str, list[str | None], list[LineProblem]]:
    """Find the delimiter and map each column to a key type or value field (``None`` = ignored)."""
    expected = "label, source, date and one of StudyInstanceUID, SOPInstanceUID, AccessionNumber"
    for delimiter in (",", ";", "\t"):
        names = next(csv.reader([text], delimiter=delimiter))
        normalized = [_normalize_header(n) for n in names]
        if "label" in normalized:
            break
    else:
        raise LabelImportError(f"line {number}: wrong header {text.strip()!r}: expected columns {expected}")
    columns: list[str | None] = []
    problems: list[LineProblem] = []
    for original, name in zip(names, normalized, strict=False):
        target = KEY_COLUMNS.get(name) or VALUE_COLUMNS.get(name)
        if target is None:
            problems.append(LineProblem(number, Reason.IGNORED_COLUMN, f"column {original!r} is not used",
                                        severity="warning"))
        elif target in columns:
            raise LabelImportError(f"line {number}: wrong header: column {original!r} appears twice")
        columns.append(target)
    missing = [c for c in ("label", "source", "date") if c not in columns]
    if missing or not any(c in KEY_COLUMNS.values() for c in columns):
        has_key = any(c in KEY_COLUMNS.values() for c in columns)
        missing_text = ", ".join(missing + ([] if has_key else ["a key column"]))
        raise LabelImportError(
            f"line {number}: wrong header {text.strip()!r}: missing {missing_text}; expected columns {expected}"
        )
    return delimiter, columns, problems


def _parse_date(value: str) -> str | None:
    """ISO ``YYYY-MM-DD`` from ``YYYY-MM-DD`` or DICOM DA ``YYYYMMDD``; ``None`` when neither."""
    if len(value) == 8 and value.isdigit():
        value = f"{value[:4]}-{value[4:6]}-{value[6:]}"
    if len(value) != 10:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        return None


def _parse_row(number: int, fields: list[str], columns: list[str | None]) -> LabelRow | LineProblem:
    if len(fields) != len(columns):
        return LineProblem(number, Reason.BAD_ROW, f"expected {len(columns)} fields, found {len(fields)}")
    values = {name: value.strip() for name, value in zip(columns, fields, strict=False) if name is not None}
    keys = [(k, values[k]) for k in KEY_COLUMNS.values() if values.get(k)]
    if not keys:
        return LineProblem(number, Reason.MISSING_KEY,
                           "no key: give a StudyInstanceUID, SOPInstanceUID or AccessionNumber")
    if len(keys) > 1:
        named = ", ".join(KEY_KEYWORDS[k] for k, _ in keys)
        return LineProblem(number, Reason.SEVERAL_KEYS, f"several keys given ({named}): give exactly one per row")
    key_type, key_value = keys[0]
    if len(key_value) > _MAX_KEY:
        return LineProblem(number, Reason.BAD_KEY, f"{KEY_KEYWORDS[key_type]} longer than {_MAX_KEY} characters")
    if key_type != "accession_number" and not _UID.match(key_value):
        return LineProblem(number, Reason.BAD_KEY,
                           f"{KEY_KEYWORDS[key_type]} {key_value!r} is not a DICOM UID (digits and dots)")
    label = values["label"].lower()
    if label not in CLASS_NAMES:
        return LineProblem(number, Reason.UNKNOWN_LABEL,
                           f"unknown label {values['label']!r} (expected one of {', '.join(CLASS_NAMES)})")
    source = values["source"].lower()
    if not source or len(source) > _MAX_SOURCE:
        return LineProblem(number, Reason.BAD_SOURCE,
                           f"source must be 1 to {_MAX_SOURCE} characters (e.g. rt-pcr, radiologist)")
    label_date = _parse_date(values["date"])
    if label_date is None:
        return LineProblem(number, Reason.BAD_DATE, f"date {values['date']!r} is not YYYY-MM-DD or YYYYMMDD")
    return LabelRow(number, key_type, key_value, label, source, label_date)


def _drop_duplicates(rows: list[LabelRow]) -> tuple[list[LabelRow], list[LineProblem]]:
    """One row per (key, source): identical repeats are ignored, conflicting ones are all refused."""
    by_key: dict[tuple[str, str, str], list[LabelRow]] = defaultdict(list)
    for row in rows:
        by_key[(row.key_type, row.key_value, row.source)].append(row)
    kept: list[LabelRow] = []
    problems: list[LineProblem] = []
    for (key_type, key_value, source), group in by_key.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        lines = ", ".join(str(r.line) for r in group)
        what = f"{KEY_KEYWORDS[key_type]} {key_value} (source {source})"
        if len({(r.label, r.label_date) for r in group}) == 1:
            kept.append(group[0])
            problems.extend(
                LineProblem(r.line, Reason.DUPLICATE_KEY,
                            f"{what} repeats line {group[0].line} with the same label; ignored", severity="warning")
                for r in group[1:]
            )
        else:
            problems.extend(
                LineProblem(r.line, Reason.DUPLICATE_KEY,
                            f"{what} appears on lines {lines} with different labels; none loaded")
                for r in group
            )
    return kept, problems


def _records(lines: list[tuple[int, str]], delimiter: str) -> Iterator[tuple[int, list[str] | LineProblem]]:
    """CSV records with the number of the line each starts on; a quoted cell may span lines.

    A record the csv module refuses (a cell over its field limit, say) is a ``bad_row`` problem
    of that record alone: the reader carries on with the next line.
    """
    consumed: list[int] = []

    def texts() -> Iterator[str]:
        for number, text in lines:
            consumed.append(number)
            yield text + "\n"

    reader = csv.reader(texts(), delimiter=delimiter)
    while True:
        first = len(consumed)
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            number = consumed[first]  # the reader took at least this line before it failed
            yield number, LineProblem(number, Reason.BAD_ROW, f"not a CSV record: {exc}")
            continue
        yield consumed[first], fields


def parse_labels(data: bytes) -> tuple[list[LabelRow], list[LineProblem], int]:
    """Parse a labels CSV without touching the database.

    Returns
    -------
    tuple
        The valid rows, every problem by line, and the number of data lines (blank lines excluded).

    Raises
    ------
    LabelImportError
        The file is empty or has no usable header.
    """
    lines, problems = decode_lines(data)
    lines = [(n, t) for n, t in lines if t.strip()]
    if not lines:
        raise LabelImportError("the file has no header and no rows" if not problems else
                               f"no readable line: {'; '.join(str(p) for p in problems[:3])}")
    header_number, header_text = lines[0]
    delimiter, columns, header_problems = _parse_header(header_number, header_text)
    problems.extend(header_problems)
    data_lines = len({p.line for p in problems if p.reason is Reason.UNDECODABLE and p.line > header_number})
    rows: list[LabelRow] = []
    for number, fields in _records(lines[1:], delimiter):
        if isinstance(fields, LineProblem):
            data_lines += 1
            problems.append(fields)
            continue
        if not any(f.strip() for f in fields):
            continue
        data_lines += 1
        parsed = _parse_row(number, fields, columns)
        if isinstance(parsed, LineProblem):
            problems.append(parsed)
        else:
            rows.append(parsed)
    rows, duplicate_problems = _drop_duplicates(rows)
    problems.extend(duplicate_problems)
    return sorted(rows, key=lambda r: r.line), problems, data_lines


def _chunks(values: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), _QUERY_CHUNK):
        yield values[start:start + _QUERY_CHUNK]


def _known_keys(session: Session, key_type: str, values: set[str]) -> set[str]:
    column = {
        "sop_instance_uid": Instance.sop_instance_uid,
        "study_instance_uid": Study.study_instance_uid,
        "accession_number": Study.accession_number,
    }[key_type]
    known: set[str] = set()
    for chunk in _chunks(sorted(values)):
        known.update(session.scalars(select(column).where(column.in_(chunk)).distinct()))
    return known


def _existing_labels(session: Session, rows: list[LabelRow]) -> dict[tuple[str, str, str], GroundTruthLabel]:
    found: dict[tuple[str, str, str], GroundTruthLabel] = {}
    by_type: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        by_type[row.key_type].add(row.key_value)
    for key_type, values in by_type.items():
        for chunk in _chunks(sorted(values)):
            query = select(GroundTruthLabel).where(GroundTruthLabel.key_type == key_type,
                                                   GroundTruthLabel.key_value.in_(chunk))
            for label in session.scalars(query):
                found[(label.key_type, label.key_value, label.source)] = label
    return found


def store_labels(session: Session, rows: list[LabelRow], result: LabelImportResult) -> None:
    """Upsert valid rows whose key names a received study or instance; unknown keys become errors."""
    by_type: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        by_type[row.key_type].add(row.key_value)
    known = {key_type: _known_keys(session, key_type, values) for key_type, values in by_type.items()}
    usable: list[LabelRow] = []
    for row in rows:
        if row.key_value in known[row.key_type]:
            usable.append(row)
        else:
            noun = "instance" if row.key_type == "sop_instance_uid" else "study"
            result.problems.append(LineProblem(
                row.line, Reason.UNKNOWN_KEY,
                f"unknown {KEY_KEYWORDS[row.key_type]} {row.key_value}: no received {noun} has it"))
    existing = _existing_labels(session, usable)
    for row in usable:
        current = existing.get((row.key_type, row.key_value, row.source))
        if current is None:
            session.add(GroundTruthLabel(key_type=row.key_type, key_value=row.key_value, label=row.label,
                                         source=row.source, label_date=row.label_date))
            result.added += 1
        elif current.label != row.label:
            session.add(LabelChange(label_id=current.id, old_label=current.label, new_label=row.label,
                                    file_name=result.file_name))
            current.label = row.label
            current.label_date = row.label_date
            result.changed += 1
        elif current.label_date != row.label_date:
            current.label_date = row.label_date
            result.updated += 1
        else:
            result.unchanged += 1


def import_labels(settings: Settings, source: Path | bytes, file_name: str | None = None) -> LabelImportResult:
    """Import a labels CSV: valid rows land in one transaction, every problem is reported by line.

    Idempotent: importing the same file again changes nothing. A key whose label differs from the
    stored one (same source) is updated and the change is recorded in ``label_changes``.

    Parameters
    ----------
    settings
        Where the database is.
    source
        The CSV file, or its bytes.
    file_name
        Name recorded with label changes; default the path's name.

    Raises
    ------
    LabelImportError
        The file cannot be read or has no usable header.
    """
    if isinstance(source, Path):
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise LabelImportError(f"cannot read {source}: {exc.strerror}") from exc
        file_name = file_name or source.name
    else:
        data = source
    result = LabelImportResult(file_name=file_name or "<bytes>")
    rows, problems, result.rows = parse_labels(data)
    result.problems.extend(problems)
    with session_scope(settings) as session:
        store_labels(session, rows, result)
    result.problems.sort(key=lambda p: p.line)
    return result
