"""CPU time per DICOM file of the pixel pipeline of one source tree (this checkout, or a revision extracted elsewhere).

Run by ``bench_ingest.py`` in a child process, so that two versions of ``ingest`` can be timed in one
run under the same conditions: the child imports ``ingest`` from ``--root`` only, inherits the
parent's one-core affinity and one-thread settings, runs in the environment that tree gives its
decode processes (``ingest.decode_pool._CHILD_ENVIRONMENT``: threads, malloc settings; it re-executes
itself to get it), and writes per file the median CPU ms of
parse + ``normalize_radiograph`` and of parse + ``decode`` alone, the decoded size and the 224 x 224
input. The files are taken in turn, ``--repeats`` passes after a warm-up pass, as a decode process
meets them: reading one file over and over makes the C allocator hand back and fault in the same
large buffers on every call, which added up to 15 ms to some files and is not what a decode
process sees. ``--old-decoders`` times that tree with pydicom's reference decoders and JPEG 2000
at full resolution (what ``cxr-norm-3`` used).

Usage::

    python bench/time_pipeline.py --root DIR --dicom-dir DIR --out RESULT.npz [--repeats 3] [--old-decoders]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_ms_in_turn(work: Callable[[bytes], Any], files: dict[str, bytes], repeats: int) -> dict[str, list[Any]]:
    """Per file: the median CPU ms of ``work`` over ``repeats`` passes through all files (after a warm-up pass),
    and the last result."""
    runs: dict[str, list[float]] = {name: [] for name in files}
    results: dict[str, Any] = {}
    for passes in range(repeats + 1):
        for name, data in files.items():
            started = time.process_time()
            results[name] = work(data)
            if passes:
                runs[name].append(time.process_time() - started)
    return {name: [statistics.median(runs[name]) * 1000, results[name]] for name in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the source tree whose ingest package is timed")
    parser.add_argument("--dicom-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help=".npz: the 224 x 224 inputs and a JSON of times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-decoders", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.root.resolve()))

    from ingest import decode_pool

    wanted = getattr(decode_pool, "_CHILD_ENVIRONMENT", {})
    if any(os.environ.get(key) != value for key, value in wanted.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})

    import numpy as np
    import pydicom

    import ingest.decoders as decoders
    from ingest import pixels

    if args.old_decoders:
        decoders.DECODING_PREFERENCE.clear()
        pixels.REDUCED_DECODE_MIN_SIDE = 1 << 30
    files = {path.name: path.read_bytes() for path in sorted(args.dicom_dir.glob("*.dcm"))}
    normalized = cpu_ms_in_turn(lambda data: pixels.normalize_radiograph(pydicom.dcmread(io.BytesIO(data))), files,
                                args.repeats)
    decoded = cpu_ms_in_turn(lambda data: pixels.decode(pydicom.dcmread(io.BytesIO(data))).shape, files, args.repeats)
    images = {name: normalized[name][1][0] for name in files}
    rows = [{"file": name, "ms": normalized[name][0], "decode_ms": decoded[name][0],
             "decoded_shape": list(decoded[name][1]), "preprocessing_version": pixels.PREPROCESSING_VERSION}
            for name in files]
    np.savez(args.out, times=np.array(json.dumps(rows)), **{f"image:{name}": image for name, image in images.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
