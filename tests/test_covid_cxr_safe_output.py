"""Escaping of control characters for logs and terminals, and inert spreadsheet cells."""

from __future__ import annotations

import logging
import sys

import pytest

from covid_cxr.safe_output import DemoteToDebug, EscapingFormatter, printable, spreadsheet_cell


@pytest.mark.parametrize(("raw", "shown"), [
    ("chest.dcm", "chest.dcm"),
    ("a\nb", "a\\x0ab"),
    ("\x1b]0;owned\x07\x1b[2J", "\\x1b]0;owned\\x07\\x1b[2J"),
    ("tab\there", "tab\\x09here"),
    ("C1\x9bcontrol", "C1\\x9bcontrol"),
    ("rtl\u202eevil\u2028next", "rtl\\u202eevil\\u2028next"),
    ("Ünïcödé 胸部", "Ünïcödé 胸部"),
])
def test_printable_escapes_every_control_character_and_keeps_the_rest(raw, shown):
    assert printable(raw) == shown


@pytest.mark.parametrize(("cell", "written"), [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
    ("@SUM(1+1)", "'@SUM(1+1)"),
    ("+1", "'+1"),
    ("-2+3", "'-2+3"),
    ("PA", "PA"),
    ("", ""),
])
def test_spreadsheet_cells_that_start_a_formula_are_made_text(cell, written):
    assert spreadsheet_cell(cell) == written


def _record(message: str, *args: object, name: str = "ingest.service", level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_a_forged_log_line_in_a_file_name_stays_on_one_line():
    formatter = EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    line = formatter.format(_record("%s -> instance 3", "x.dcm\n2026-01-01 ERROR ingest: forged"))
    assert "\n" not in line
    assert line == "INFO ingest.service: x.dcm\\x0a2026-01-01 ERROR ingest: forged -> instance 3"


def test_a_traceback_keeps_its_lines_but_not_the_escapes_inside_them():
    formatter = EscapingFormatter("%(message)s")
    try:
        raise ValueError("bad \x1b[2J value")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = formatter.format(record)
    assert text.startswith("failed\nTraceback")
    assert "\x1b" not in text and "\\x1b[2J" in text


def test_a_library_error_is_demoted_to_debug_and_hidden_unless_debugging():
    demote = DemoteToDebug("pydicom")
    ours = _record("kept", level=logging.ERROR)
    assert demote.filter(ours) and ours.levelno == logging.ERROR
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        theirs = _record("Error decoding", name="pydicom.pixels.decoders.base", level=logging.ERROR)
        assert demote.filter(theirs) is False
        assert (theirs.levelno, theirs.levelname) == (logging.DEBUG, "DEBUG")
        root.setLevel(logging.DEBUG)
        assert demote.filter(_record("Error", name="pydicom", level=logging.ERROR)) is True
    finally:
        root.setLevel(before)


def test_only_the_named_message_of_a_library_is_demoted():
    demote = DemoteToDebug("watchdog.observers.inotify", containing="called when the thread is inactive")
    race = _record("InotifyEmitter.queue_events() called when the thread is inactive",
                   name="watchdog.observers.inotify", level=logging.ERROR)
    other = _record("Unable to rebuild recursive inotify watches", name="watchdog.observers.inotify",
                    level=logging.ERROR)
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        assert demote.filter(race) is False and race.levelno == logging.DEBUG
        assert demote.filter(other) is True and other.levelno == logging.ERROR
    finally:
        root.setLevel(before)


def test_a_library_warning_is_logged_on_one_escaped_line_and_known_noise_is_demoted(monkeypatch):
    """Python prints warnings raw to stderr; a library's warning can quote a header (pydicom names an unknown
    character set as the file spells it). Once routed through logging it is one escaped line."""
    import io
    import warnings

    from covid_cxr.safe_output import WARNINGS_LOGGER, log_handler, log_warnings

    stream = io.StringIO()
    handler = log_handler(stream, "%(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger(WARNINGS_LOGGER)
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # put back after the test
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)
    try:
        log_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn_explicit("Unknown encoding 'EVIL\x1b[2J\x1b]0;OWNED\x07'", UserWarning,
                                   "/opt/lib/somelibrary/charset.py", 7)
            warnings.warn_explicit("Unknown encoding 'EVIL'", UserWarning, "/opt/lib/pydicom/charset.py", 7)
            warnings.warn_explicit("Callback with id '1' already exists for watch <Watch(/inbox/.claims/x/s1)>",
                                   RuntimeWarning, "/opt/lib/watchdog/observers/inotify.py", 365)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == ["WARNING py.warnings: UserWarning: Unknown encoding 'EVIL\\x1b[2J\\x1b]0;OWNED\\x07' "
                     "(/opt/lib/somelibrary/charset.py:7)"]
