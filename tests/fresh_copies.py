"""Test and benchmark helper: new DICOM instances from real files (fresh Study/Series/SOP Instance UIDs, same pixels).

The service records a SOPInstanceUID once, so a test or benchmark that drops the same real file many times needs each
copy to be a new instance. Used by the tests and by ``bench/`` (which puts ``tests/`` on its path).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def _renew(ds: pydicom.Dataset) -> bytes:
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def with_fresh_uids(source: Path | bytes) -> bytes:
    """The file (a path or its bytes) as a new instance: new Study, Series and SOP Instance UIDs, pixels untouched."""
    return _renew(pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source))


def write_fresh_copies(sources: Sequence[Path], n: int, folder: Path,
                       name: Callable[[int], str] = "image-{:04d}.dcm".format) -> list[Path]:
    """``n`` new instances of ``sources`` (cycled) written into ``folder`` as ``name(i)``, which may hold a
    sub-folder; each source is parsed once."""
    datasets = [pydicom.dcmread(source) for source in sources]
    paths = []
    for i in range(n):
        path = folder / name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_renew(datasets[i % len(datasets)]))
        paths.append(path)
    return paths
