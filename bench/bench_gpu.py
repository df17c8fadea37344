"""GPU readiness in one run: bare-model images/s in fp32 and mixed precision, how far mixed-precision scores move, and
the pipeline ratio with one worker.

1. The bare model as a worker runs it (``tf.function`` of ``model(x, training=False)``), random weights
   unless ``--artifact`` names a trained one, timed at batch 32, 64 and 128 in fp32 and in the mixed
   precision a worker gets from ``COVID_CXR_MIXED_PRECISION`` (``worker.inference.with_precision``).
2. The largest difference of the mixed-precision covid probability from fp32 over real chest images
   of ``../shared/data/cxr``.
3. ``bench/bench_pipeline.py --modes embedded``: ``covid-cxr serve`` (one worker) fed real DICOM files,
   images/s end to end against the bare model.

Without a GPU it still runs, on few images and small batches, and says plainly that the figures are
CPU figures. Usage (``bench/bench_gpu.sh`` runs this)::

    python bench/bench_gpu.py [--mixed bf16|fp16] [--batch-sizes 32,64,128] [--artifact RUN_DIR] [--no-pipeline]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from bench_inference import bare_images_per_second
from machine_info import describe_machine, machine_line

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CXR_DIR = REPO_ROOT.parent / "shared" / "data" / "cxr"
#: With a GPU / on the CPU only: batch sizes, seconds per timing, images compared, files through the pipeline.
GPU_DEFAULTS = {"batch_sizes": "32,64,128", "seconds": 10.0, "images": 64, "pipeline_n": 256}
CPU_DEFAULTS = {"batch_sizes": "4", "seconds": 2.0, "images": 8, "pipeline_n": 4}


def load_model(artifact: Path | None) -> Any:
    from model_store.architecture import build_model
    from model_store.artifact import load_model_file

    return build_model(None) if artifact is None else load_model_file(artifact / "model.keras")


def shared_images(cxr_dir: Path, count: int) -> np.ndarray:
    """``count`` real chest radiographs, alternating classes, normalized as the ingester does."""
    from ingest.pixels import load_image_file, normalize_grayscale

    folders = [sorted(p for p in (cxr_dir / label).iterdir() if p.is_file()) for label in ("covid", "normal")]
    paths = [folders[i % 2][i // 2] for i in range(min(count, 2 * min(len(f) for f in folders)))]
    return np.stack([normalize_grayscale(load_image_file(path)) for path in paths])


def covid_probabilities(forward: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    from model_store.architecture import to_model_input

    out = [np.asarray(forward(to_model_input(images[i:i + batch_size])), dtype=np.float64)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)[:, 0]


def pipeline_ratio(n: int, batch_size: int, dicom_dir: Path | None = None) -> dict[str, Any]:
    """``bench_pipeline.py --modes embedded`` (``serve``, one worker) on ``n`` files; its result as a dict."""
    with tempfile.TemporaryDirectory(prefix="covid-cxr-bench-gpu-") as folder:
        out = Path(folder) / "pipeline.json"
        subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_pipeline.py"), "--modes", "embedded",
                        "--n", str(n), "--batch-size", str(batch_size), "--json", str(out),
                        *(["--dicom-dir", str(dicom_dir)] if dicom_dir else [])],
                       check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        result: dict[str, Any] = json.loads(out.read_text())["results"][0]
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mixed", choices=("bf16", "fp16"), default="bf16", help="mixed precision to compare "
                        "with fp32 (default bf16)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 32,64,128 on a GPU, 4 on the CPU)")
    parser.add_argument("--seconds", type=float, help="timed seconds per measurement (default 10 GPU, 2 CPU)")
    parser.add_argument("--images", type=int, help="shared images whose scores are compared (default 64 / 8)")
    parser.add_argument("--artifact", type=Path, help="a trained model's artifact folder (default: random weights)")
    parser.add_argument("--cxr-dir", type=Path, default=DEFAULT_CXR_DIR)
    parser.add_argument("--dicom-dir", type=Path, help="chest DICOM files for the pipeline (default: bench_pipeline's)")
    parser.add_argument("--pipeline-n", type=int, help="files through covid-cxr serve (default 256 / 4)")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the pipeline ratio")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from worker.inference import compile_forward, configure_devices, with_precision

    gpus = configure_devices()
    defaults = GPU_DEFAULTS if gpus else CPU_DEFAULTS
    batch_sizes = [int(b) for b in (args.batch_sizes or str(defaults["batch_sizes"])).split(",") if b.strip()]
    seconds = args.seconds if args.seconds is not None else float(defaults["seconds"])
    n_images = args.images or int(defaults["images"])
    pipeline_n = args.pipeline_n or int(defaults["pipeline_n"])
    if gpus:
        print(f"GPU: {', '.join(gpus)}")
    else:
        print(f"NO GPU FOUND: the Keras backend sees no GPU, so this ran on the CPU with small batches "
              f"({', '.join(map(str, batch_sizes))}) and {n_images} images. These are CPU figures, not GPU ones; "
              f"run bench/bench_gpu.sh on a machine with an NVIDIA GPU and tensorflow[and-cuda] "
              f"(docker build --target cuda) for those.")
    print(f"machine: {machine_line(describe_machine())}", flush=True)

    model = load_model(args.artifact)
    variants = {"fp32": compile_forward(model), args.mixed: compile_forward(with_precision(model, args.mixed))}
    rates: dict[str, dict[int, float]] = {name: {} for name in variants}
    for batch_size in batch_sizes:
        for name, forward in variants.items():
            rates[name][batch_size] = bare_images_per_second(forward, batch_size, seconds=seconds,
                                                             min_calls=2)["images_per_s"]
    print(f"\nbare model images/s ({'random weights' if args.artifact is None else args.artifact}):")
    print(f"| batch | fp32 | {args.mixed} | {args.mixed} ÷ fp32 |\n|---:|---:|---:|---:|")
    for batch_size in batch_sizes:
        fp32, mixed = rates["fp32"][batch_size], rates[args.mixed][batch_size]
        print(f"| {batch_size} | {fp32:.1f} | {mixed:.1f} | {mixed / fp32:.2f} |")

    images = shared_images(args.cxr_dir, n_images)
    reference = covid_probabilities(variants["fp32"], images, batch_sizes[0])
    mixed_scores = covid_probabilities(variants[args.mixed], images, batch_sizes[0])
    largest = float(np.abs(mixed_scores - reference).max())
    print(f"\nlargest |{args.mixed} - fp32| covid probability over {len(images)} shared images: {largest:.5f}",
          flush=True)

    pipeline: dict[str, Any] | None = None
    if not args.no_pipeline:
        pipeline = pipeline_ratio(pipeline_n, max(batch_sizes), args.dicom_dir)
        print(f"\npipeline (covid-cxr serve, one {'GPU' if gpus else 'CPU'} worker, fp32, {pipeline['n']} files, "
              f"batch {pipeline['batch_size']}): {pipeline['pipeline_images_per_s']:.2f} images/s, bare model "
              f"{pipeline['bare_model_images_per_s']:.2f} images/s, ratio {pipeline['ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"gpus": gpus, "mixed": args.mixed, "images_per_s": rates,
                                         "largest_score_difference": largest, "images": len(images),
                                         "pipeline": pipeline}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
