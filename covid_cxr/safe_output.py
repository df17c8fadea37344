"""Text from file names and DICOM headers made safe to show: in logs, on terminals and in spreadsheets.

A hospital network can put anything into a file name or a header value: a newline and a forged log
line, ANSI escapes that clear a terminal or set its title, a formula a spreadsheet evaluates.
Everything covid-cxr prints or logs goes through here first.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import TextIO

#: C0 and C1 controls, DEL, the Unicode line separators and bidirectional overrides that reorder or
#: break what a reader sees, and lone surrogates (bytes of a non-UTF-8 file name, which a UTF-8
#: terminal or log file cannot even encode).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
#: Cells starting with one of these are formulas to Excel, LibreOffice and Google Sheets.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n`` becomes ``\\x0a``)."""
    return _CONTROL.sub(_escape, text)


def printable_lines(text: str) -> str:
    """``text`` with its line breaks kept and every other control character escaped."""
    return "\n".join(printable(line) for line in text.split("\n"))


def spreadsheet_cell(value: str) -> str:
    """A CSV cell that a spreadsheet shows as text: formula starters get a leading apostrophe (OWASP)."""
    return "'" + value if value.startswith(_FORMULA_START) else value


class EscapingFormatter(logging.Formatter):
    """A log formatter that escapes control characters in the message, so one record is one line.

    A traceback keeps its own line breaks; control characters inside its lines are escaped too.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return printable_lines(super().formatStack(stack_info))


class DemoteToDebug(logging.Filter):
    """A handler filter that turns the records of one library (``name`` and below) into DEBUG ones;
    with ``containing``, only those whose message holds that text.

    pydicom logs an ERROR with a full traceback when a decoder fails, although the file is then
    rejected with a reason code and a one-line message; an operator should not see a crash there.
    Records of other loggers pass unchanged.
    """

    def __init__(self, name: str = "", containing: str | None = None) -> None:
        super().__init__(name)
        self.containing = containing

    def filter(self, record: logging.LogRecord) -> bool:
        if not super().filter(record):
            return True
        if self.containing is not None and self.containing not in record.getMessage():
            return True
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger().isEnabledFor(logging.DEBUG)


#: The logger that Python warnings go to once :func:`log_warnings` is on (the name ``logging.captureWarnings`` uses).
WARNINGS_LOGGER = "py.warnings"


def library_noise() -> list[logging.Filter]:
    """What every covid-cxr process demotes to DEBUG: library messages about events it handles itself."""
    return [
        # A decoder failure is an expected rejection with its own reason line, not a crash to show.
        DemoteToDebug("pydicom"),
        # pydicom warns what it also logs (above): a file's problems are its rejection's message.
        DemoteToDebug(WARNINGS_LOGGER, containing=f"{os.sep}pydicom{os.sep}"),
        # watchdog's observer thread, stopped while it reads (the inbox went away and the watcher is re-armed),
        # logs this at ERROR although nothing is lost: the inbox presence check re-arms and rescans.
        DemoteToDebug("watchdog.observers.inotify", containing="called when the thread is inactive"),
        # watchdog re-adding the watch of a claim folder made again at once after it emptied: nothing is missed.
        DemoteToDebug(WARNINGS_LOGGER, containing="already exists for watch"),
    ]


def log_handler(stream: TextIO, fmt: str) -> logging.Handler:
    """The handler every covid-cxr process logs through: one line per record, control characters escaped, library
    noise demoted (:func:`library_noise`)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter(fmt))
    for noise in library_noise():
        handler.addFilter(noise)
    return handler


def log_warnings() -> None:
    """Send Python warnings through logging, one line each.

    Python prints a library's warning raw to stderr, and a library's warning can quote a file: pydicom names an
    unknown character set as the header spells it (control characters included). Logged, it is escaped like
    every record.
    """
    warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    logging.getLogger(WARNINGS_LOGGER).warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)
