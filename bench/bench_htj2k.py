"""HTJ2K decoding: OpenJPH (the imagecodecs plugin covid-cxr uses) against openjpeg (pydicom's pylibjpeg reference).

No HTJ2K radiograph is in the shared data, so each shared chest or hip radiograph of 3 MP and more is decoded by
the reference and its pixels re-encoded as HTJ2K with OpenJPH: lossless (reversible 5/3 wavelet) and lossy
(irreversible 9/7, quantisation ``--lossy-level``). Each file is then decoded by both plugins through pydicom,
alternately, in this process pinned to one core with one thread, ``--repeats`` times; the median CPU time is
reported, with the ratio reference / OpenJPH measured in the same run, and how far the 224 x 224 model input
moves between the two (not at all, as the tests assert). A lossy codestream is sent to openjpeg by
``ingest.pixels.decode`` whichever plugin is preferred (OpenJPH does not clamp an irreversible reconstruction),
so its ratio is about 1: the row shows what the service pays. Usage::

    python bench/bench_htj2k.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import describe_machine, machine_line  # noqa: E402

DEFAULT_DICOM_DIR = REPO.parent / "shared" / "data" / "dicom"
#: Radiographs of 3 MP and more in the shared set, in several source syntaxes.
FILES = ["pylibjpeg-data__966_fixed.dcm", "pylibjpeg-data__RG2_JPLL.dcm", "pylibjpeg-data__RG1_JLSN.dcm",
         "orthanc-tests__Monochrome1-Jpeg.dcm"]


def as_htj2k(ds: Any, reversible: bool, lossy_level: float) -> Any:
    import imagecodecs
    import pydicom

    from ingest.decoders import PYLIBJPEG

    pixels, _ = pydicom.pixels.decoders.base.get_decoder(ds.file_meta.TransferSyntaxUID).as_array(
        ds, decoding_plugin=PYLIBJPEG)
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = pydicom.uid.HTJ2KLossless if reversible else pydicom.uid.HTJ2K
    options = {} if reversible else {"level": lossy_level}
    out.PixelData = pydicom.encaps.encapsulate([imagecodecs.htj2k_encode(pixels, reversible=reversible, **options)])
    out["PixelData"].VR = "OB"
    return out


def cpu_ms(step: Callable[[], object]) -> float:
    started = time.process_time()
    step()
    return (time.process_time() - started) * 1000.0


def measure(ds: Any, repeats: int) -> dict[str, Any]:
    import numpy as np

    import ingest.decoders as decoders
    from ingest.pixels import decode, normalize_radiograph

    syntax = ds.file_meta.TransferSyntaxUID
    preference = decoders.DECODING_PREFERENCE[syntax]
    assert decoders.choose_plugin(syntax) == decoders.IMAGECODECS, "imagecodecs has no HTJ2K (OpenJPH) here"
    times: dict[str, list[float]] = {"openjph": [], "openjpeg": []}
    try:
        for _ in range(repeats):  # alternately, so that drift weighs on both
            decoders.DECODING_PREFERENCE[syntax] = preference
            times["openjph"].append(cpu_ms(lambda: decode(ds)))
            decoders.DECODING_PREFERENCE[syntax] = (decoders.PYLIBJPEG,)
            times["openjpeg"].append(cpu_ms(lambda: decode(ds)))
        reference, _ = normalize_radiograph(ds)
    finally:
        decoders.DECODING_PREFERENCE[syntax] = preference
    fast, _ = normalize_radiograph(ds)
    moved = np.abs(fast.astype(np.int16) - reference.astype(np.int16))
    openjph, openjpeg = (statistics.median(values) for values in (times["openjph"], times["openjpeg"]))
    return {"openjph_ms": openjph, "openjpeg_ms": openjpeg, "speed_up": openjpeg / openjph,
            "input_max_levels": int(moved.max()), "input_mean_levels": float(moved.mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom-dir", type=Path, default=DEFAULT_DICOM_DIR)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lossy-level", type=float, default=0.5, help="OpenJPH quantisation step of the lossy case")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import pydicom

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rows = []
    for name in FILES:
        source = pydicom.dcmread(args.dicom_dir / name)
        for reversible in (True, False):
            ds = as_htj2k(source, reversible, args.lossy_level)
            row = {"file": name, "megapixels": source.Rows * source.Columns / 1e6,
                   "kind": "lossless" if reversible else "lossy", **measure(ds, args.repeats)}
            rows.append(row)
            print(f"{name} {row['kind']}: openjpeg {row['openjpeg_ms']:.1f} ms, OpenJPH {row['openjph_ms']:.1f} ms "
                  f"({row['speed_up']:.1f}x); model input max {row['input_max_levels']}, "
                  f"mean {row['input_mean_levels']:.4f} levels", flush=True)
    machine = describe_machine(with_tensorflow=False)
    print(f"\nMachine: {machine_line(machine)}; one core, CPU time, median of {args.repeats}\n")
    print("| file | MP | HTJ2K | openjpeg ms | OpenJPH ms | openjpeg ÷ OpenJPH | model input moved: max, mean |")
    print("|---|---:|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['file']} | {row['megapixels']:.1f} | {row['kind']} | {row['openjpeg_ms']:.1f} | "
              f"{row['openjph_ms']:.1f} | **{row['speed_up']:.1f}** | {row['input_max_levels']}, "
              f"{row['input_mean_levels']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
