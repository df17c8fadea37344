"""Hostile files built from the shared radiographs: codestreams that declare a huge image, a file of zeros.

Each keeps the file's length and every DICOM element intact, so only the size a decoder
would allocate changes; used by the tests and by bench/bench_ingest.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

J2K_CHEST = "pydicom-data__RG1_J2KI.dcm"  # 677 KB, JPEG 2000, 1955 x 1841
JPEG_CHEST = "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # 127 KB


def j2k_siz_bomb(source: Path, rows: int = 40000, columns: int = 40000, *, header_too: bool = False) -> bytes:
    """``source`` (JPEG 2000) with its SIZ segment declaring ``rows`` x ``columns`` (and Rows/Columns if
    ``header_too``)."""
    data = bytearray(source.read_bytes())
    siz = data.index(b"\xff\x4f\xff\x51") + 4  # SOC, SIZ, then Lsiz Rsiz Xsiz Ysiz
    struct.pack_into(">II", data, siz + 4, columns, rows)
    return _patch_header(bytes(data), rows, columns) if header_too else bytes(data)


def jpeg_sof_bomb(source: Path, rows: int = 60000, columns: int = 60000, *, header_too: bool = False) -> bytes:
    """``source`` (baseline JPEG) with its SOF0 declaring ``rows`` x ``columns`` (and Rows/Columns if
    ``header_too``)."""
    data = bytearray(source.read_bytes())
    codestream = data.index(b"\xff\xd8\xff", data.index(b"\xe0\x7f\x10\x00"))  # SOI inside Pixel Data
    sof = data.index(b"\xff\xc0", codestream)
    struct.pack_into(">HH", data, sof + 5, rows, columns)  # marker, Lf, P, then Y and X
    return _patch_header(bytes(data), rows, columns) if header_too else bytes(data)


def zeros_after_dicm(size: int) -> bytes:
    """A 128-byte preamble, ``DICM``, then zeros up to ``size`` bytes."""
    return bytes(128) + b"DICM" + bytes(size - 132)


def _patch_header(data: bytes, rows: int, columns: int) -> bytes:
    """Rows (0028,0010) and Columns (0028,0011) set in place (explicit VR little endian, US)."""
    patched = bytearray(data)
    for element, value in ((0x0010, rows), (0x0011, columns)):
        tag = struct.pack("<HH", 0x0028, element) + b"US" + struct.pack("<H", 2)
        position = patched.index(tag)
        struct.pack_into("<H", patched, position + 8, value)
    return bytes(patched)
