"""Labels CSV import: keys, idempotence, changes recorded, and per-line errors while valid rows land."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from covid_cxr.errors import LabelImportError
from covid_cxr.settings import load_settings
from db.labels import import_labels, parse_labels
from db.migrate import upgrade
from db.models import GroundTruthLabel, Instance, LabelChange, Study
from db.session import session_scope

STUDY_A, STUDY_B = "1.2.826.0.1.1", "1.2.826.0.1.2"
SOP_A1, SOP_B1 = "1.2.826.0.1.1.1", "1.2.826.0.1.2.1"
HEADER = "StudyInstanceUID,label,source,date\n"


@pytest.fixture
def settings(tmp_path):
    settings = load_settings(data_dir=tmp_path)
    upgrade(settings)
    with session_scope(settings) as session:
        for study_uid, sop_uid, accession in ((STUDY_A, SOP_A1, "ACC-A"), (STUDY_B, SOP_B1, "ACC-B")):
            study = Study(study_instance_uid=study_uid, accession_number=accession)
            session.add(study)
            session.flush()
            session.add(Instance(state="predicted", file_name=f"{sop_uid}.dcm", file_sha256=sop_uid.ljust(64, "0"),
                                 study_id=study.id, study_instance_uid=study_uid, sop_instance_uid=sop_uid))
    return settings


def _labels(settings) -> dict[tuple[str, str, str], tuple[str, str]]:
    with session_scope(settings) as session:
        return {(r.key_type, r.key_value, r.source): (r.label, r.label_date)
                for r in session.scalars(select(GroundTruthLabel))}


def _problems(result) -> list[tuple[int, str, str]]:
    return [(p.line, p.severity, p.reason) for p in result.problems]


def test_each_key_type_lands_and_reimport_changes_nothing(settings, tmp_path):
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text(
        "StudyInstanceUID,SOPInstanceUID,AccessionNumber,label,source,date\n"
        f"{STUDY_A},,,covid,RT-PCR,2026-11-20\n"
        f",{SOP_B1},,Normal,radiologist,20261121\n"
        f",,ACC-B,normal,rt-pcr,2026-11-22\n"
    )
    first = import_labels(settings, csv_file)
    assert (first.rows, first.added, first.problems) == (3, 3, [])
    assert _labels(settings) == {
        ("study_instance_uid", STUDY_A, "rt-pcr"): ("covid", "2026-11-20"),
        ("sop_instance_uid", SOP_B1, "radiologist"): ("normal", "2026-11-21"),
        ("accession_number", "ACC-B", "rt-pcr"): ("normal", "2026-11-22"),
    }
    second = import_labels(settings, csv_file)
    assert (second.added, second.changed, second.updated, second.unchanged) == (0, 0, 0, 3)
    assert len(_labels(settings)) == 3


def test_changed_label_is_updated_and_the_change_recorded(settings):
    import_labels(settings, f"{HEADER}{STUDY_A},normal,rt-pcr,2026-11-20\n".encode(), file_name="monday.csv")
    result = import_labels(settings, f"{HEADER}{STUDY_A},covid,rt-pcr,2026-11-23\n".encode(), file_name="tuesday.csv")
    assert (result.changed, result.added) == (1, 0)
    assert _labels(settings) == {("study_instance_uid", STUDY_A, "rt-pcr"): ("covid", "2026-11-23")}
    with session_scope(settings) as session:
        change = session.scalars(select(LabelChange)).one()
        assert (change.old_label, change.new_label, change.file_name) == ("normal", "covid", "tuesday.csv")
    # A second source for the same key is another label, not a change.
    other = import_labels(settings, f"{HEADER}{STUDY_A},normal,radiologist,2026-11-23\n".encode())
    assert other.added == 1
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(LabelChange)) == 1


def test_unknown_keys_and_labels_are_reported_by_line_while_valid_rows_land(settings):
    result = import_labels(settings, (
        HEADER
        + f"{STUDY_A},covid,rt-pcr,2026-11-20\n"
        + "1.2.999.9,covid,rt-pcr,2026-11-20\n"  # unknown study
        + f"{STUDY_B},positive,rt-pcr,2026-11-20\n"  # unknown label
        + "\n"
        + f"{STUDY_B},normal,rt-pcr,yesterday\n"
        + "not-a-uid,normal,rt-pcr,2026-11-20\n"
        + f"{STUDY_B},normal,rt-pcr\n"
    ).encode())
    assert _problems(result) == [
        (3, "error", "unknown_key"),
        (4, "error", "unknown_label"),
        (6, "error", "bad_date"),
        (7, "error", "bad_key"),
        (8, "error", "bad_row"),
    ]
    assert "unknown StudyInstanceUID 1.2.999.9" in result.problems[0].message
    assert "'positive'" in result.problems[1].message and "covid, normal" in result.problems[1].message
    assert (result.rows, result.added) == (6, 1)
    assert list(_labels(settings)) == [("study_instance_uid", STUDY_A, "rt-pcr")]


@pytest.mark.parametrize("header, missing", [
    ("StudyUID,label,source,date", "a key column"),
    ("StudyInstanceUID,diagnosis,source,date", "expected columns"),
    ("StudyInstanceUID,label,date", "missing source"),
    ("StudyInstanceUID,label,source,date,label", "appears twice"),
])
def test_wrong_header_is_refused_with_line_one_named(settings, header, missing):
    with pytest.raises(LabelImportError, match=f"line 1: wrong header.*{missing}"):
        import_labels(settings, f"{header}\n{STUDY_A},covid,rt-pcr,2026-11-20\n".encode())
    assert _labels(settings) == {}


def test_empty_file_is_refused(settings):
    with pytest.raises(LabelImportError, match="no header"):
        import_labels(settings, b"\n\n")


def test_mixed_encodings_load_with_a_warning_and_binary_lines_are_errors(settings):
    data = (
        "\ufeffAccessionNumber;Label;Source;Date;Comment\n".encode("utf-8")  # BOM, semicolons
        + "ACC-A;covid;rt-pcr;2026-11-20;Dr. Müller\n".encode()
        + "ACC-B;normal;rt-pcr;2026-11-20;Dr. Müller\n".encode("cp1252")
        + b"ACC-B;normal;radiologist;2026-11-20;\x00\x01\x02\n"
        + b"ACC-B;normal;radiologist;2026-11-20;\x81\x8d\n"  # not UTF-8, undefined in cp1252
    )
    result = import_labels(settings, data)
    assert _problems(result) == [
        (1, "warning", "ignored_column"),
        (3, "warning", "not_utf8"),
        (4, "error", "undecodable"),
        (5, "error", "undecodable"),
    ]
    assert (result.rows, result.added) == (4, 2)
    assert set(_labels(settings)) == {("accession_number", "ACC-A", "rt-pcr"), ("accession_number", "ACC-B", "rt-pcr")}


def test_utf16_spreadsheet_export_is_read(settings):
    data = f"StudyInstanceUID\tlabel\tsource\tdate\r\n{STUDY_A}\tcovid\trt-pcr\t2026-11-20\r\n".encode("utf-16")
    assert import_labels(settings, data).added == 1


def test_duplicate_keys_identical_are_ignored_conflicting_are_refused(settings):
    result = import_labels(settings, (
        HEADER
        + f"{STUDY_A},covid,rt-pcr,2026-11-20\n"
        + f"{STUDY_B},normal,rt-pcr,2026-11-20\n"
        + f"{STUDY_A},covid,RT-PCR,2026-11-20\n"  # same label: harmless repeat
        + f"{STUDY_B},covid,rt-pcr,2026-11-20\n"  # contradicts line 3
    ).encode())
    assert _problems(result) == [
        (3, "error", "duplicate_key"),
        (4, "warning", "duplicate_key"),
        (5, "error", "duplicate_key"),
    ]
    assert "lines 3, 5" in result.problems[0].message
    assert list(_labels(settings)) == [("study_instance_uid", STUDY_A, "rt-pcr")]


def test_rows_need_exactly_one_key(settings):
    result = import_labels(settings, (
        "StudyInstanceUID,AccessionNumber,label,source,date\n"
        f"{STUDY_A},ACC-A,covid,rt-pcr,2026-11-20\n"
        ",,covid,rt-pcr,2026-11-20\n"
    ).encode())
    assert _problems(result) == [(2, "error", "several_keys"), (3, "error", "missing_key")]


def test_parse_labels_needs_no_database():
    rows, problems, data_lines = parse_labels(f"{HEADER}{STUDY_A},COVID,Rt-Pcr,2026-11-20\n".encode())
    assert problems == [] and data_lines == 1
    assert (rows[0].key_type, rows[0].label, rows[0].source, rows[0].label_date) == (
        "study_instance_uid", "covid", "rt-pcr", "2026-11-20")


def test_an_oversized_field_is_one_bad_row_and_the_valid_rows_still_load(settings):
    result = import_labels(settings, (
        f"{HEADER}"
        f"{STUDY_A},covid,rt-pcr,2026-11-20\n"
        f"{STUDY_B},{'x' * 200_000},rt-pcr,2026-11-20\n"
        f"{STUDY_B},normal,radiologist,2026-11-21\n"
    ).encode())
    assert _problems(result) == [(3, "error", "bad_row")]
    assert "field limit" in result.problems[0].message
    assert result.added == 2 and result.rows == 3


def test_a_quoted_cell_over_several_lines_is_one_row(settings):
    rows, problems, data_lines = parse_labels((
        "StudyInstanceUID,label,source,date,comment\n"
        f'{STUDY_A},covid,rt-pcr,2026-11-20,"first line\nsecond line"\n'
        f"{STUDY_B},normal,rt-pcr,2026-11-21,plain\n"
    ).encode())
    assert [p.reason for p in problems] == ["ignored_column"]
    assert data_lines == 2
    assert [(r.line, r.key_value) for r in rows] == [(2, STUDY_A), (4, STUDY_B)]
