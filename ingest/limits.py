"""Cheap guards that run before a file is parsed or decoded: its size, and whether DICOM elements follow DICM."""

from __future__ import annotations

import struct

from covid_cxr.errors import InputRejected
from covid_cxr.reasons import Reason

#: Offset of the first element of a Part 10 file: 128-byte preamble + "DICM".
PART10_FIRST_ELEMENT = 132
#: Explicit VRs whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def check_file_size(size: int, max_bytes: int) -> None:
    """Reject (``too_large``) a file of ``size`` bytes above ``max_bytes``, before any of it is read."""
    if size > max_bytes:
        raise InputRejected(f"the file has {size} bytes, more than the limit of {max_bytes} "
                            "(COVID_CXR_MAX_FILE_BYTES)", reason=Reason.TOO_LARGE)


def first_dataset_tag(data: bytes) -> tuple[int, int] | None:
    """(group, element) of the first element after a Part 10 file's meta group, ``None`` when the bytes end first.

    The file meta group is always explicit VR little endian (PS3.10 7.1), so its elements can
    be stepped over without pydicom.
    """
    position = PART10_FIRST_ELEMENT
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            return group, element
        vr = bytes(data[position + 4:position + 6])
        if vr in _LONG_VRS:
            if position + 12 > len(data):
                return None
            (length,) = struct.unpack_from("<I", data, position + 8)
            position += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            position += 8 + length
    return None


def check_plausible_part10(data: bytes) -> None:
    """Reject (``not_dicom``) a file with the DICM prefix whose first dataset element is group 0000.

    Group 0000 (DIMSE commands) never occurs in a stored object; it is what zeros (or a file
    of padding) read as, and pydicom would spend about a quarter of a second per megabyte
    reading them as empty elements. A real file starts with group 0002 (file meta), then
    0008 or another object group.
    """
    tag = first_dataset_tag(data)
    if tag is not None and tag[0] == 0x0000:
        raise InputRejected("has the DICM prefix but no plausible DICOM element follows it (group 0000, e.g. zeros)",
                            reason=Reason.NOT_DICOM)
