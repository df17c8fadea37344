"""Pipeline benchmark: drop N real DICOM files into the inbox and time them to their predictions.

For each mode (the embedded default ``covid-cxr serve``; ``covid-cxr ingest`` + ``covid-cxr
worker`` on Redis + PostgreSQL) this script

1. registers a VGG16 with random weights (speed does not depend on the weights),
2. times the bare model, the worker's compiled ``model(x, training=False)``
   (``worker.inference.compile_forward``) on batches of ``--batch-size`` real
   normalized chest images, in this process, just before and just after the mode runs,
3. starts the service as an operator would (subprocesses), warms it up with one file,
4. renames N files into the inbox at once (chest files of ``../shared/data/dicom`` cycled, each
   with fresh Study/Series/SOP Instance UIDs so that none is a duplicate), and
5. reads from the database when each one's prediction was written, and
6. with ``--lone K``, then drops K files one at a time, each a second after the one before was predicted
   (studies arriving alone, as at night), for the latency of a lone file.

It prints end-to-end images/s (first drop -> last prediction), drop -> prediction latency
p50/p95 (under that burst of N), the bare model's images/s and the ratio pipeline / bare model,
beside the ceiling of that ratio when decoding and the model share the same CPU cores:
``1 / (1 + ingest seconds per image x bare images/s / cores)``.

    .venv/bin/python bench/bench_pipeline.py --n 96                  # both modes
    .venv/bin/python bench/bench_pipeline.py --modes embedded --n 32
    .venv/bin/python bench/bench_pipeline.py --modes embedded --batch-when-idle both --lone 8

Not a test: run on demand; nothing here is fetched from the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from machine_info import describe_machine, machine_line

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]  # tests/fresh_copies.py writes the staged files

DEFAULT_DICOM_DIR = REPO_ROOT.parent / "shared" / "data" / "dicom"
CHEST_FILES = (
    "torchxrayvision__siim-acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "dwv__gdcm-CR-MONO1-10-chest.dcm",
    "orthanc-tests__Monochrome1-Jpeg.dcm",
    "pydicom-data__RG1_J2KI.dcm",
    "pylibjpeg-data__RG1_JLSN.dcm",
    "pylibjpeg-data__966_fixed.dcm",
)
POSTGRES_ADMIN_URL = os.environ.get("COVID_CXR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BENCH_REDIS_URL = "redis://127.0.0.1:6379/14"


@dataclass
class Result:
    mode: str
    n: int
    batch_size: int
    pipeline_images_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    mean_batch: float
    bare_model_images_per_s: float = 0.0
    ratio: float = 0.0
    cpu_bound_ratio: float = 0.0
    wall_s: float = 0.0
    load_average: str = ""
    lone_latency_p50_s: float | None = None
    #: "batch when idle: true/false" when ``--batch-when-idle both`` runs the mode twice, else empty.
    variant: str = ""


# --- preparation -------------------------------------------------------------------------------------


def stage_files(dicom_dir: Path, n: int, staging: Path) -> list[Path]:
    """``n`` copies of the chest files, cycled, each a new instance (fresh UIDs), written before timing."""
    from fresh_copies import write_fresh_copies

    return write_fresh_copies([dicom_dir / name for name in CHEST_FILES], n, staging, "bench-{:04d}.dcm".format)


def register_model(settings, artifact_dir: Path):  # type: ignore[no-untyped-def]
    from db.migrate import upgrade
    from model_store.registry import import_artifact

    upgrade(settings)
    return import_artifact(settings, artifact_dir, activate=True)


def build_artifact(out: Path):  # type: ignore[no-untyped-def]
    from covid_cxr.constants import CLASS_NAMES, DECISION_THRESHOLD, MODEL_NAME
    from ingest.pixels import PREPROCESSING_VERSION
    from model_store.architecture import ARCHITECTURE, build_model
    from model_store.artifact import save_artifact

    metadata = {"name": MODEL_NAME, "architecture": ARCHITECTURE, "base_weights": "none",
                "preprocessing_version": PREPROCESSING_VERSION, "class_names": list(CLASS_NAMES),
                "decision_threshold": DECISION_THRESHOLD, "notes": "benchmark model (random weights)"}
    return save_artifact(build_model(None), metadata, out)


class BareModel:
    """The registered model loaded here, timed on a batch of real normalized chest images."""

    def __init__(self, artifact, dicom_dir: Path, batch_size: int) -> None:  # type: ignore[no-untyped-def]
        import numpy as np

        from model_store.architecture import to_model_input
        from model_store.artifact import load_verified_model
        from worker.inference import compile_forward, configure_devices

        configure_devices()
        self.model = load_verified_model(artifact.model_path, artifact.sha256)
        self.forward = compile_forward(self.model)  # the forward pass a worker runs
        images = [read_chest(dicom_dir, name) for name in CHEST_FILES]
        self.batch = to_model_input(np.stack([images[i % len(images)] for i in range(batch_size)]))
        self.batch_size = batch_size
        np.asarray(self.forward(self.batch))  # warm-up (tracing)

    def images_per_s(self, batches: int) -> float:
        """The worker's compiled forward pass ``batches`` times, nothing else running in this process."""
        import numpy as np

        started = time.perf_counter()
        for _ in range(batches):
            np.asarray(self.forward(self.batch))
        return self.batch_size * batches / (time.perf_counter() - started)


def reader_policy():  # type: ignore[no-untyped-def]
    from covid_cxr.settings import load_settings
    from ingest.reader import ReaderPolicy

    return ReaderPolicy.from_settings(load_settings().with_ephemeral_pseudonym_key())  # no key file written


def read_chest(dicom_dir: Path, name: str):  # type: ignore[no-untyped-def]
    from ingest.reader import read_radiograph

    policy = reader_policy()
    result = read_radiograph(dicom_dir / name, policy)
    assert result.accepted, f"{name}: {result.reason}"
    return result.image


def ingest_seconds_per_image(dicom_dir: Path, rounds: int = 2) -> float:
    """Mean single-core time of ``read_radiograph`` (decode + normalize) over the chest files cycled."""
    from ingest.reader import read_radiograph

    policy = reader_policy()
    data = [(dicom_dir / name).read_bytes() for name in CHEST_FILES]
    started = time.perf_counter()
    for _ in range(rounds):
        for blob in data:
            read_radiograph(blob, policy)
    return (time.perf_counter() - started) / (rounds * len(data))


# --- running the service -------------------------------------------------------------------------------


def service_env(settings_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **settings_env}


def start(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    import signal

    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def prediction_times(settings) -> dict[str, datetime]:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from db.models import Instance, Prediction
    from db.session import session_scope

    with session_scope(settings) as session:
        rows = session.execute(select(Instance.file_name, Prediction.created_at)
                               .join(Prediction, Prediction.instance_id == Instance.id)).all()
    return {name: _aware(created) for name, created in rows}


def mean_batch_size(settings, names: set[str]) -> float:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from db.models import Instance, Prediction
    from db.session import session_scope

    with session_scope(settings) as session:
        sizes = session.scalars(select(Prediction.batch_size).join(Instance, Prediction.instance_id == Instance.id)
                                .where(Instance.file_name.in_(names))).all()
    return statistics.mean(s for s in sizes if s) if sizes else 0.0


def failures(settings) -> list[str]:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from db.models import Instance
    from db.session import session_scope

    with session_scope(settings) as session:
        rows = session.execute(select(Instance.file_name, Instance.state, Instance.reason)
                               .where(Instance.state.in_(["rejected", "failed", "duplicate"]))).all()
    return [f"{name}: {state} ({reason})" for name, state, reason in rows]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def wait_for_predictions(settings, names: set[str], timeout: float, processes) -> dict[str, datetime]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        done = prediction_times(settings)
        if names <= set(done):
            return done
        bad = [f for f in failures(settings) if f.split(":")[0] in names]
        if bad:
            raise RuntimeError("benchmark files did not get predictions: " + "; ".join(bad[:5]))
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a service process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(names) - len(names & set(done))} of {len(names)} files still unpredicted")
        time.sleep(0.25)


def run_mode(mode: str, args: argparse.Namespace, artifact_dir: Path, workdir: Path, *, when_idle: bool = True,
             variant: str = "") -> Result:
    from covid_cxr.settings import load_settings

    label = f"{mode}, {variant}" if variant else mode
    data_dir = workdir / label / "data"
    inbox = workdir / label / "inbox"
    env_settings = {
        "COVID_CXR_DATA_DIR": str(data_dir),
        "COVID_CXR_INBOX_DIR": str(inbox),
        "COVID_CXR_BATCH_SIZE": str(args.batch_size),
        "COVID_CXR_BATCH_MAX_WAIT_SECONDS": str(args.batch_max_wait),
        "COVID_CXR_BATCH_WHEN_IDLE": "true" if when_idle else "false",
    }
    database = None
    if mode == "distributed":
        database = create_postgres_database()
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
        env_settings |= {"COVID_CXR_DATABASE_URL": database, "COVID_CXR_BROKER_URL": args.redis_url}
    settings = load_settings(data_dir=data_dir, inbox_dir=inbox, database_url=database,
                             broker_url=args.redis_url if mode == "distributed" else None)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        register_model(settings, artifact_dir)
        staged = stage_files(args.dicom_dir, args.n + 1 + args.lone, workdir / label / "staging")
        lone = [staged.pop() for _ in range(args.lone)]
        env = service_env(env_settings)
        logs = workdir / label
        if mode == "embedded":
            processes.append(start([sys.executable, "-m", "covid_cxr", "serve"], env, logs / "serve.log"))
        else:
            processes.append(start([sys.executable, "-m", "covid_cxr", "worker", "--queues", settings.inference_queue],
                                   env, logs / "worker.log"))
            processes.append(start([sys.executable, "-m", "covid_cxr", "ingest"], env, logs / "ingest.log"))
        # Warm-up: one file all the way through (worker started, model loaded, connections open).
        inbox.mkdir(parents=True, exist_ok=True)
        warm = staged.pop()
        warm.rename(inbox / warm.name)
        wait_for_predictions(settings, {warm.name}, 300, processes)

        dropped: dict[str, datetime] = {}
        started = time.perf_counter()
        for path in staged:
            dropped[path.name] = datetime.now(UTC)
            path.rename(inbox / path.name)  # atomic: the watcher takes it at once
        done = wait_for_predictions(settings, set(dropped), args.timeout, processes)
        wall = time.perf_counter() - started
        first_drop = min(dropped.values())
        last_prediction = max(done[name] for name in dropped)
        latencies = sorted((done[name] - dropped[name]).total_seconds() for name in dropped)
        throughput = len(dropped) / (last_prediction - first_drop).total_seconds()
        result = Result(mode=mode, variant=variant, n=len(dropped), batch_size=args.batch_size,
                        pipeline_images_per_s=throughput, latency_p50_s=statistics.median(latencies),
                        latency_p95_s=latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
                        mean_batch=mean_batch_size(settings, set(dropped)), wall_s=wall)
        if lone:  # studies arriving one at a time, as at night: each dropped once the one before is predicted
            lone_latencies = []
            for path in lone:
                time.sleep(1.0)
                dropped_at = datetime.now(UTC)
                path.rename(inbox / path.name)
                done = wait_for_predictions(settings, {path.name}, 300, processes)
                lone_latencies.append((done[path.name] - dropped_at).total_seconds())
            result.lone_latency_p50_s = statistics.median(lone_latencies)
        return result
    finally:
        for process in reversed(processes):
            stop(process)
        if database is not None:
            from db.session import dispose_engines

            dispose_engines()
            drop_postgres_database(database)


def create_postgres_database() -> str:
    import sqlalchemy as sa

    name = f"covid_cxr_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return sa.engine.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    import sqlalchemy as sa

    name = sa.engine.make_url(url).database
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def markdown_table(results: list[Result]) -> str:
    lines = ["| mode | N | mean batch | pipeline img/s | latency p50 | latency p95 | bare model img/s "
             "| pipeline ÷ model | CPU-bound ceiling | lone file latency p50 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"embedded": "embedded (`serve`: SQLite + folder broker)",
             "distributed": "distributed (`ingest` + `worker`: PostgreSQL + Redis)"}
    for r in results:
        name = names[r.mode] + (f", {r.variant}" if r.variant else "")
        lines.append(f"| {name} | {r.n} | {r.mean_batch:.1f} | {r.pipeline_images_per_s:.2f} | "
                     f"{r.latency_p50_s:.1f} s | {r.latency_p95_s:.1f} s | {r.bare_model_images_per_s:.2f} | "
                     f"{r.ratio:.2f} | {r.cpu_bound_ratio:.2f} | "
                     f"{'—' if r.lone_latency_p50_s is None else f'{r.lone_latency_p50_s:.2f} s'} |")
    return "\n".join(lines)


def load_average() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=96, help="files dropped per mode (default 96)")
    parser.add_argument("--batch-size", type=int, default=32, help="inference batch size (default 32)")
    parser.add_argument("--batch-max-wait", type=float, default=2.0, help="partial batch wait, seconds (default 2)")
    parser.add_argument("--modes", default="embedded,distributed", help="embedded, distributed or both")
    parser.add_argument("--batch-when-idle", choices=("true", "false", "both"), default="true",
                        help="COVID_CXR_BATCH_WHEN_IDLE; 'both' runs each mode without, then with, early partial "
                             "batches (default true)")
    parser.add_argument("--lone", type=int, default=0,
                        help="after the burst, drop this many files one at a time and report their median latency")
    parser.add_argument("--dicom-dir", type=Path, default=DEFAULT_DICOM_DIR)
    parser.add_argument("--redis-url", default=BENCH_REDIS_URL, help=f"flushed before use (default {BENCH_REDIS_URL})")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the N predictions")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, databases)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    workdir = Path(tempfile.mkdtemp(prefix="covid-cxr-bench-"))
    try:
        artifact = build_artifact(workdir / "model")
        batches = max(2, args.n // args.batch_size)
        bare = BareModel(artifact, args.dicom_dir, args.batch_size)
        ingest_cost = ingest_seconds_per_image(args.dicom_dir)
        cores = len(os.sched_getaffinity(0))
        print(f"ingest (read + normalize): {ingest_cost:.2f} s per image on one core", flush=True)
        results = []
        variants = {"true": [True], "false": [False], "both": [False, True]}[args.batch_when_idle]
        runs = [(mode, idle) for mode in [m.strip() for m in args.modes.split(",") if m.strip()] for idle in variants]
        for mode, idle in runs:
            variant = f"batch when idle: {str(idle).lower()}" if len(variants) > 1 else ""
            label = f"{mode}, {variant}" if variant else mode
            # The bare model is timed just before and just after each mode and averaged, so that
            # other load on the machine affects both sides of the ratio alike.
            before = bare.images_per_s(batches)
            result = run_mode(mode, args, artifact.directory, workdir, when_idle=idle, variant=variant)
            after = bare.images_per_s(batches)
            result.bare_model_images_per_s = (before + after) / 2
            result.ratio = result.pipeline_images_per_s / result.bare_model_images_per_s
            # If decoding and the model share the same cores, each image costs cores/bare + ingest_cost core-seconds.
            result.cpu_bound_ratio = 1 / (1 + ingest_cost * result.bare_model_images_per_s / cores)
            result.load_average = load_average()
            print(f"{label}: {result.pipeline_images_per_s:.2f} images/s; bare model {before:.2f} before, {after:.2f} "
                  f"after; ratio {result.ratio:.2f} (CPU-bound ceiling {result.cpu_bound_ratio:.2f}); "
                  f"load average {result.load_average}", flush=True)
            results.append(result)
        print()
        print(f"Machine: {machine_line(describe_machine())}")
        print(f"Run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {args.n} files per mode cycled from "
              f"{len(CHEST_FILES)} chest DICOM files, fresh UIDs, all dropped at once; batch size "
              f"{args.batch_size}, max wait {args.batch_max_wait} s; ingest {ingest_cost:.2f} s/image on one core")
        print()
        print(markdown_table(results))
        if args.json:
            args.json.write_text(json.dumps({"machine": describe_machine(), "ingest_seconds_per_image": ingest_cost,
                                             "results": [asdict(r) for r in results]}, indent=2))
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
