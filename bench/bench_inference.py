"""Bare-model throughput: images/s of ``model(x, training=False)`` on batches of 1, 8 and 32, on this machine.

The ceiling the service's pipeline is measured against (``bench/bench_pipeline.py`` prints the
ratio). Usage::

    python bench/bench_inference.py [--batch-sizes 1,8,32] [--seconds 10] [--compiled] [--json out.json]

``--compiled`` also times the same call wrapped in ``tf.function`` (what a worker could use instead).
Other benchmarks import :func:`bare_images_per_second`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from machine_info import describe_machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_images_per_second(forward: Callable[[Any], Any], batch_size: int, seconds: float = 10.0,
                           min_calls: int = 3) -> dict[str, float]:
    """Time ``forward`` on random ``(batch_size, 224, 224)`` uint8 images scaled as the worker scales them.

    One untimed warm-up call first (graph tracing, memory allocation); then calls until both
    ``seconds`` and ``min_calls`` are reached. Input scaling is excluded: it is the same in both.
    """
    from covid_cxr.constants import IMAGE_SIZE
    from model_store.architecture import to_model_input

    rng = np.random.default_rng(0)
    x = to_model_input(rng.integers(0, 256, size=(batch_size, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))
    np.asarray(forward(x))
    calls, started, cpu_started = 0, time.perf_counter(), time.process_time()
    per_call = []
    while calls < min_calls or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        np.asarray(forward(x))
        per_call.append(time.perf_counter() - t0)
        calls += 1
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return {
        "batch_size": batch_size,
        "calls": calls,
        "images_per_s": calls * batch_size / elapsed,
        "ms_per_image": 1000.0 * elapsed / (calls * batch_size),
        "ms_per_call_p50": 1000.0 * float(np.median(per_call)),
        # CPU time of this process (all its threads): what the work costs whatever else the machine runs.
        "cpu_ms_per_image": 1000.0 * cpu / (calls * batch_size),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per batch size (default 10)")
    parser.add_argument("--compiled", action="store_true", help="also time tf.function(model)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from model_store.architecture import build_model

    # Other work on the machine changes the figures: record the load around the run.
    load_before = os.getloadavg()[0]
    model = build_model(None)  # the weights do not change the arithmetic
    variants: dict[str, Callable[[Any], Any]] = {"model(x, training=False)": lambda x: model(x, training=False)}
    if args.compiled:
        import tensorflow as tf

        compiled = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        variants["tf.function"] = compiled
    rows = []
    for name, forward in variants.items():
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            row = {"variant": name, **bare_images_per_second(forward, batch_size, args.seconds)}
            rows.append(row)
            print(f"{name:26s} batch {batch_size:3d}: {row['images_per_s']:6.2f} images/s "
                  f"({row['ms_per_image']:6.1f} ms/image wall, {row['cpu_ms_per_image']:6.1f} ms/image CPU, "
                  f"{row['calls']} calls)", flush=True)
    result = {"machine": {**describe_machine(), "load_average_1min_before_after": [load_before, os.getloadavg()[0]]},
              "results": rows}
    print(json.dumps(result["machine"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
