"""Reads what a JPEG, JPEG-LS or JPEG 2000 codestream declares about its image (size, components), without decoding.

A decoder allocates what the codestream declares, not what the DICOM header says, so a
677 KB file whose JPEG 2000 SIZ segment declares 40000 x 40000 asks for gigabytes before
anything fails. Comparing the codestream's own frame header (JPEG SOFn, JPEG-LS SOF55,
JPEG 2000 SIZ) with Rows x Columns costs microseconds and rejects such a file before any
decoding (:func:`check_codestream_matches`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from covid_cxr.errors import InputRejected
from covid_cxr.reasons import Reason

#: JPEG start-of-frame markers (ITU T.81 B.1.1.3): SOF0-3, 5-7, 9-11, 13-15; 0xC4 (DHT), 0xC8 (JPG) and
#: 0xCC (DAC) share the range but are not frames. 0xF7 is JPEG-LS's SOF55 (ITU T.87).
JPEG_FRAME_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
#: Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_J2K_COD = 0x52
#: How far into a codestream its frame header is looked for (APPn segments can hold thumbnails).
HEADER_SEARCH_BYTES = 1 << 20


@dataclass(frozen=True)
class CodestreamHeader:
    """What a codestream's frame header declares.

    ``kind`` is ``"jpeg"`` (T.81, including lossless), ``"jpeg-ls"`` or ``"jpeg2000"``;
    ``rows`` is 0 when a JPEG frame defers its height to a DNL marker. For JPEG 2000,
    ``signed`` and ``precision`` are those of the first component,
    ``decomposition_levels`` the number of wavelet levels of the main header's COD segment
    (``None``: no COD found), which bounds the resolution levels a decoder can skip, and
    ``reversible`` whether that wavelet is the reversible 5/3 one (lossless-capable) rather than the
    irreversible 9/7 one (``None``: no COD found).
    """

    kind: str
    rows: int
    columns: int
    components: int
    precision: int
    signed: bool = False
    decomposition_levels: int | None = None
    reversible: bool | None = None


def read_codestream_header(codestream: bytes) -> CodestreamHeader:
    """The frame header of a JPEG / JPEG-LS (starts with SOI) or JPEG 2000 codestream (SOC then SIZ, or a JP2 file).

    Raises ``ValueError`` when no frame header is found within :data:`HEADER_SEARCH_BYTES`
    or it is cut short.
    """
    data = memoryview(codestream)[:HEADER_SEARCH_BYTES]
    if bytes(data[:2]) == _JPEG_SOI:
        return _jpeg_header(data)
    start = bytes(data[:4096]).find(_J2K_SOC_SIZ)  # a JP2 file wraps the codestream in boxes
    if start >= 0:
        return _j2k_header(data[start:])
    raise ValueError("neither a JPEG (SOI) nor a JPEG 2000 (SOC, SIZ) codestream")


def _jpeg_header(data: memoryview) -> CodestreamHeader:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ValueError(f"no JPEG marker at offset {position} before the frame header")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        if marker in JPEG_FRAME_MARKERS:
            if length < 8 or position + 2 + length > len(data):
                raise ValueError("the JPEG frame header is cut short")
            precision, rows, columns, components = struct.unpack_from(">BHHB", data, position + 4)
            kind = "jpeg-ls" if marker == 0xF7 else "jpeg"
            return CodestreamHeader(kind, rows, columns, components, precision)
        if marker == 0xDA:
            raise ValueError("a JPEG scan starts before any frame header")
        position += 2 + length
    raise ValueError("no JPEG frame header (SOFn / SOF55) found")


def _j2k_header(data: memoryview) -> CodestreamHeader:
    # SIZ (ITU T.800 A.5.1): Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz, then Ssiz XRsiz YRsiz
    # per component; the image area is Xsiz - XOsiz by Ysiz - YOsiz.
    if len(data) < 4 + 38 + 3:
        raise ValueError("the JPEG 2000 SIZ segment is cut short")
    length, _, xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">HHIIII", data, 4)
    (components,) = struct.unpack_from(">H", data, 4 + 36)
    ssiz = data[4 + 38]
    levels = reversible = None
    position = 4 + length
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        (segment_length,) = struct.unpack_from(">H", data, position + 2)
        if marker == _J2K_COD and position + 2 + 12 <= len(data):
            # Lcod Scod SGcod(progression, layers, MCT), then SPcod: levels, code-block width, height and style,
            # and the wavelet transformation (1: reversible 5/3, 0: irreversible 9/7).
            levels = data[position + 2 + 7]
            reversible = data[position + 2 + 11] == 1
            break
        if marker == 0x90:  # SOT: the main header is over
            break
        position += 2 + segment_length
    return CodestreamHeader("jpeg2000", ysiz - yosiz, xsiz - xosiz, components, (ssiz & 0x7F) + 1,
                            bool(ssiz & 0x80), levels, reversible)


def check_codestream_matches(codestream: bytes, rows: int | None, columns: int | None,
                             samples_per_pixel: int | None, syntax_name: str) -> CodestreamHeader:
    """Reject (``codestream_mismatch``) a codestream whose frame header disagrees with the DICOM header.

    The codestream must declare exactly ``rows`` x ``columns`` (a JPEG height deferred to a
    DNL marker, 0, is accepted as long as the width matches) and no more components than
    ``samples_per_pixel`` (default 1). An unreadable frame header is ``decode_failed``.
    Returns the header for the decoder's use.
    """
    try:
        header = read_codestream_header(codestream)
    except (ValueError, struct.error) as exc:
        raise InputRejected(f"the {syntax_name} codestream has no readable frame header: {exc}",
                            reason=Reason.DECODE_FAILED) from exc
    expected_components = samples_per_pixel or 1
    rows_differ = header.rows != rows and not (header.kind == "jpeg" and header.rows == 0)
    if rows_differ or header.columns != columns or header.components > expected_components:
        raise InputRejected(
            f"the {syntax_name} codestream declares {header.rows} x {header.columns} with {header.components} "
            f"component(s), the header {rows} x {columns} with {expected_components}",
            reason=Reason.CODESTREAM_MISMATCH,
        )
    return header
