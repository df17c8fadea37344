"""Text from file names and DICOM headers made safe to show: in logs, on terminals and in spreadsheets.

A hospital network can put anything into a file name or a header value: a newline and a forged log
line, ANSI escapes that clear a terminal or set its title, a formula a spreadsheet evaluates.
Everything covid-cxr prints or logs goes through here first.
"""

from __future__ import annotations

import logging
import re

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
