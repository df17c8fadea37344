"""The sha256 of a file, read in chunks: how artifacts, weights files and datasets are identified."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, without holding the whole file in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
