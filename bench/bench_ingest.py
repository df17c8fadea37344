"""Ingest alone (no worker): files/s for 1 and N decode processes and for 1 and 2 ingesters on one inbox, per-syntax
CPU cost of this checkout's pipeline against a baseline beside one VGG16 forward pass, and the three bombs.

1. **Throughput.** N fresh-UID copies of the six shared chest radiographs (JPEG baseline, JPEG 2000,
   JPEG-LS, uncompressed), renamed into the inbox at once, ingested by real ``covid-cxr ingest``
   processes on PostgreSQL + Redis: one ingester with 1 decode process, one with ``--processes``,
   and two ingesters with ``processes / 2`` each (the same total). Files/s = N / (last row's
   commit - drop). Configurations are interleaved, ``--rounds`` times, and the median is taken,
   so that other load on a shared machine weighs on all of them. ``--throughput-baseline REVISION``
   adds that revision's ingester (extracted with ``git archive``) with 1 and ``--processes`` decode
   processes to the interleaving, so that a change to the loop is measured against its parent in one run.
2. **Per syntax** (one core, one thread, CPU time): parse + normalize, and parse + decode alone, of
   every shared file with this checkout's pipeline and with a baseline: ``--baseline old-decoders``
   (pylibjpeg, JPEG 2000 at full resolution: ``cxr-norm-3``'s decoders with this checkout's steps)
   or ``--baseline REVISION`` (that git revision's whole pipeline, extracted with ``git archive``).
   Both are timed by ``time_pipeline.py`` in child processes, alternately, ``--rounds`` times (median),
   beside one VGG16 forward pass (``weights=None``, batch 1) timed in this process before and after;
   and how far the 224 x 224 input and that model's score move between the two.
3. **Bombs.** One ingester gets the three hostile files of tests/bombs.py, then a normal file 1 s
   later: how long until the normal file is recorded, and the peak resident memory of the ingester
   and its decode processes (sampled every 50 ms) against their caps.

Usage::

    python bench/bench_ingest.py [--n 60] [--processes 2] [--rounds 2] [--json out.json]
    python bench/bench_ingest.py --parts throughput --database sqlite --cpus 0,1   # two quiet cores, no servers
    python bench/bench_ingest.py --parts throughput --database sqlite --throughput-baseline REVISION
    python bench/bench_ingest.py --parts per-syntax --baseline REVISION [--rounds 3] [--repeats 5]   # no servers
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_pipeline import CHEST_FILES, DEFAULT_DICOM_DIR, create_postgres_database, drop_postgres_database
from machine_info import describe_machine, machine_line

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                  "TF_NUM_INTEROP_THREADS"):
    os.environ[_variable] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

BENCH_REDIS_URL = "redis://127.0.0.1:6379/13"
KEY = "bench-ingest-pseudonym-key-0123456789abcdef"
#: Goals of the issue, as fractions of one forward pass.
GOAL_FRACTION = {"JPEG 2000": 0.25}
DEFAULT_GOAL_FRACTION = 0.10


# --- throughput ------------------------------------------------------------------------------------


def stage(dicom_dir: Path, n: int, staging: Path) -> list[str]:
    from fresh_copies import write_fresh_copies

    paths = write_fresh_copies([dicom_dir / name for name in CHEST_FILES], n, staging, "f{:04d}.dcm".format)
    return [path.name for path in paths]


def create_database(kind: str, workdir: Path) -> str:
    """A new empty database: on the PostgreSQL server of the tests, or an SQLite file (the embedded default)."""
    if kind == "postgres":
        return create_postgres_database()
    return f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:8]}.sqlite3'}"


def drop_database(url: str) -> None:
    if url.startswith("postgresql"):
        drop_postgres_database(url)


def broker_for(url: str) -> str | None:
    """Redis beside PostgreSQL (the distributed layout); the folder broker under the data folder beside SQLite."""
    return BENCH_REDIS_URL if url.startswith("postgresql") else None


#: CPUs the ingesters (and so their decode processes, which inherit it) are pinned to; ``None``: all of them.
PINNED_CPUS: set[int] | None = None


def _pin() -> None:
    if PINNED_CPUS:
        os.sched_setaffinity(0, PINNED_CPUS)


def start_ingester(data_dir: Path, url: str, processes: int, log_path: Path,
                   extra: dict[str, str] | None = None, root: Path = REPO_ROOT) -> subprocess.Popen[bytes]:
    """A ``covid-cxr ingest`` of the source tree ``root`` (this checkout, or an extracted baseline revision)."""
    broker = broker_for(url)
    env = {**os.environ, "COVID_CXR_DATABASE_URL": url, "COVID_CXR_PSEUDONYM_KEY": KEY,
           "COVID_CXR_SETTLE_SECONDS": "0.2", "COVID_CXR_DECODE_PROCESSES": str(processes),
           **({"COVID_CXR_BROKER_URL": broker} if broker else {}), **(extra or {})}
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "covid_cxr", "ingest", "--data-dir", str(data_dir)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, preexec_fn=_pin)
    deadline = time.monotonic() + 180
    while "watching" not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the ingester did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid`` itself and of its live children (the decode processes)."""
    own = children = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(entry.name) == pid:
            own += seconds
        elif int(fields[1]) == pid:
            children += seconds
    return own, children


def rows_committed(url: str) -> tuple[int, float | None]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            count, last = conn.execute(sa.text("SELECT count(*), max(created_at) FROM instances")).one()
    finally:
        engine.dispose()
    if isinstance(last, str):  # SQLite without type information in a raw query
        last = datetime.fromisoformat(last)
    if last is not None and last.tzinfo is None:  # stored in UTC
        last = last.replace(tzinfo=UTC)
    return int(count), None if last is None else last.timestamp()


def throughput(dicom_dir: Path, n: int, ingesters: int, processes_each: int, workdir: Path,
               database: str, root: Path = REPO_ROOT) -> dict[str, Any]:
    from covid_cxr.settings import load_settings
    from db.migrate import upgrade

    url = create_database(database, workdir)
    data_dir = workdir / f"data-{uuid.uuid4().hex[:6]}"
    try:
        upgrade(load_settings(data_dir=data_dir, database_url=url, broker_url=broker_for(url)))
        (data_dir / "inbox").mkdir(parents=True)
        names = stage(dicom_dir, n, data_dir / "staging")
        running = [start_ingester(data_dir, url, processes_each, workdir / f"ingest-{uuid.uuid4().hex[:6]}.log",
                                  root=root) for _ in range(ingesters)]
        try:
            time.sleep(2.0)  # the decode processes have imported the reader
            before = [tree_cpu_seconds(p.pid) for p in running]
            dropped = time.time()
            for name in names:
                os.rename(data_dir / "staging" / name, data_dir / "inbox" / name)
            deadline = time.monotonic() + 900
            while (state := rows_committed(url))[0] < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {state[0]} of {n} files recorded")
                time.sleep(0.2)
            after = [tree_cpu_seconds(p.pid) for p in running]
            loop_cpu = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
            decode_cpu = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
        finally:
            for process in running:
                stop(process)
        last = state[1] or time.time()
        elapsed = last - dropped
        return {"ingesters": ingesters, "processes_each": processes_each, "n": n, "seconds": elapsed,
                "files_per_s": n / elapsed, "cpu_s_per_file": (loop_cpu + decode_cpu) / n,
                "loop_cpu_s_per_file": loop_cpu / n, "decode_cpu_s_per_file": decode_cpu / n,
                "load": os.getloadavg()[0]}
    finally:
        drop_database(url)


# --- per syntax -----------------------------------------------------------------------------------


def per_syntax(dicom_dir: Path, repeats: int, rounds: int, baseline: str, workdir: Path) -> dict[str, Any]:
    """CPU ms per file of this checkout and of ``baseline``, on one core; input and score movement; one forward pass."""
    import numpy as np
    import tensorflow as tf

    from model_store.architecture import build_model

    if hasattr(os, "sched_setaffinity"):  # the timing children inherit the core
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras_model = build_model(None)
    forward_input = np.zeros((1, 224, 224, 3), dtype=np.float32)
    keras_model(forward_input, training=False)

    def forward_ms() -> list[float]:
        runs = []
        for _ in range(max(3, repeats)):
            started = time.process_time()
            np.asarray(keras_model(forward_input, training=False))
            runs.append((time.process_time() - started) * 1000)
        return runs

    def score(image: np.ndarray) -> float:
        x = np.repeat(image[None, :, :, None].astype(np.float32), 3, axis=3)
        return float(np.asarray(keras_model(x, training=False))[0, -1])

    forward_before = forward_ms()
    baseline_root = REPO_ROOT if baseline == "old-decoders" else extract_revision(baseline, workdir)
    sides: dict[str, list[dict[str, Any]]] = {"baseline": [], "now": []}
    for round_index in range(rounds):
        for side, root in (("baseline", baseline_root), ("now", REPO_ROOT)):
            out = workdir / f"{side}-{round_index}.npz"
            command = [sys.executable, str(REPO_ROOT / "bench" / "time_pipeline.py"), "--root", str(root),
                       "--dicom-dir", str(dicom_dir), "--out", str(out), "--repeats", str(repeats)]
            if side == "baseline" and baseline == "old-decoders":
                command.append("--old-decoders")
            env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
            subprocess.run(command, check=True, env=env, cwd=root)
            with np.load(out) as saved:
                sides[side].append({"times": {row["file"]: row for row in json.loads(str(saved["times"]))},
                                    "images": {key.split(":", 1)[1]: saved[key] for key in saved.files
                                               if key.startswith("image:")}})
    forward_after = forward_ms()

    import pydicom

    rows = []
    for path in sorted(dicom_dir.glob("*.dcm")):
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        now, before = sides["now"][0], sides["baseline"][0]
        new_image, old_image = now["images"][path.name], before["images"][path.name]
        difference = np.abs(new_image.astype(np.int16) - old_image.astype(np.int16))

        def median_of(side: str, key: str, name: str = path.name) -> float:
            return statistics.median(run["times"][name][key] for run in sides[side])

        rows.append({"file": path.name, "syntax": syntax.name, "uid": str(syntax),
                     "decoded_shape": now["times"][path.name]["decoded_shape"],
                     "before_ms": median_of("baseline", "ms"), "after_ms": median_of("now", "ms"),
                     "before_decode_ms": median_of("baseline", "decode_ms"),
                     "after_decode_ms": median_of("now", "decode_ms"),
                     "input_max_diff": int(difference.max()), "input_mean_diff": float(difference.mean()),
                     "score_diff": abs(score(new_image) - score(old_image))})
    versions = {side: runs[0]["times"][rows[0]["file"]]["preprocessing_version"] for side, runs in sides.items()}
    return {"forward_ms": statistics.median(forward_before + forward_after),
            "forward_ms_before": statistics.median(forward_before),
            "forward_ms_after": statistics.median(forward_after), "baseline": baseline, "versions": versions,
            "rounds": rounds, "repeats": repeats, "rows": rows}


def extract_revision(revision: str, workdir: Path) -> Path:
    """The source tree of a git revision of this repository, extracted under ``workdir``."""
    target = workdir / f"baseline-{revision.replace('/', '_')}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


# --- bombs ------------------------------------------------------------------------------------------


def bombs(dicom_dir: Path, processes: int, memory_mb: int, workdir: Path, database: str) -> dict[str, Any]:
    from bombs import J2K_CHEST, JPEG_CHEST, j2k_siz_bomb, jpeg_sof_bomb, zeros_after_dicm
    from fresh_copies import with_fresh_uids

    from covid_cxr.settings import load_settings
    from db.migrate import upgrade

    url = create_database(database, workdir)
    data_dir = workdir / "bombs"
    try:
        upgrade(load_settings(data_dir=data_dir, database_url=url, broker_url=broker_for(url)))
        inbox = data_dir / "inbox"
        inbox.mkdir(parents=True)
        process = start_ingester(data_dir, url, processes, workdir / "bombs.log",
                                 {"COVID_CXR_DECODE_MEMORY_MB": str(memory_mb)})
        peak_kib = 0
        try:
            files = {"j2k-siz.dcm": j2k_siz_bomb(dicom_dir / J2K_CHEST),
                     "jpeg-sof.dcm": jpeg_sof_bomb(dicom_dir / JPEG_CHEST),
                     "zeros.dcm": zeros_after_dicm(200 * 1024 * 1024)}
            for name, data in files.items():
                (data_dir / f".{name}").write_bytes(data)
                os.rename(data_dir / f".{name}", inbox / name)
            time.sleep(1.0)
            (data_dir / ".normal.dcm").write_bytes(with_fresh_uids(dicom_dir / JPEG_CHEST))
            dropped = time.monotonic()
            os.rename(data_dir / ".normal.dcm", inbox / "normal.dcm")
            normal_after = None
            while time.monotonic() - dropped < 60:
                peak_kib = max(peak_kib, tree_rss_kib(process.pid))
                if normal_after is None and recorded(url, "normal.dcm"):
                    normal_after = time.monotonic() - dropped
                if normal_after is not None and rows_committed(url)[0] >= 4:
                    break
                time.sleep(0.05)
            reasons = reasons_by_file(url)
        finally:
            stop(process)
        return {"normal_recorded_after_s": normal_after, "peak_rss_mib": peak_kib / 1024, "reasons": reasons,
                "cap_mib": memory_mb, "processes": processes}
    finally:
        drop_database(url)


def tree_rss_kib(pid: int) -> int:
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(entry.name) == pid or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total


def recorded(url: str, name: str) -> bool:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT count(*) FROM instances WHERE file_name = :n"), {"n": name})
                        .scalar())
    finally:
        engine.dispose()


def reasons_by_file(url: str) -> dict[str, str | None]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {name: reason for name, reason in conn.execute(sa.text("SELECT file_name, reason FROM instances"))}
    finally:
        engine.dispose()


# --- report ---------------------------------------------------------------------------------------


def syntax_family(uid: str) -> str:
    if uid.startswith("1.2.840.10008.1.2.4.9"):
        return "JPEG 2000"
    return ""


def _one_process_label(label: str) -> str:
    """The row ``label`` is compared with: one ingester, one decode process, of the same code (this checkout's, or
    the baseline revision's)."""
    if label.startswith("baseline "):
        return label.split(": ", 1)[0] + ": 1 ingester x 1 process(es)"
    return "1 ingester x 1 process"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Machine: {machine_line(result['machine'])}; load average before: {result['load_before']}, "
             f"after: {result['load_after']}; database: {result['database']}; ingesters pinned to CPUs: "
             f"{result['cpus'] or 'all'}.", ""]
    runs = result.get("throughput")
    if runs:
        lines += ["| ingest (no worker) | files/s (median) | × one process | each round | CPU ms/file: loop + decode |",
                  "|---|---:|---:|---|---:|"]
        for label, run in runs.items():
            base = runs[_one_process_label(label)]["files_per_s"]
            rounds = ", ".join(f"{r['files_per_s']:.1f}" for r in result["throughput_runs"][label])
            lines.append(f"| {label} | {run['files_per_s']:.1f} | {run['files_per_s'] / base:.2f} | {rounds} | "
                         f"{run['loop_cpu_s_per_file'] * 1000:.1f} + {run['decode_cpu_s_per_file'] * 1000:.1f} |")
    syntax = result.get("per_syntax")
    if syntax:
        forward = syntax["forward_ms"]
        versions = syntax["versions"]
        lines += ["", f"One VGG16 forward pass (batch 1, one thread, CPU): {forward:.0f} ms (median; "
                  f"{syntax['forward_ms_before']:.0f} before the pipelines were timed, "
                  f"{syntax['forward_ms_after']:.0f} after). Baseline: {syntax['baseline']} "
                  f"({versions['baseline']}); now: {versions['now']}; "
                  f"median of {syntax['rounds']} rounds of {syntax['repeats']} repeats. CPU ms per file, parse + "
                  "normalize; decode = parse + decode alone.", "",
                  "| file | transfer syntax | decoded MP | baseline ms | now ms | now decode ms | now / forward | "
                  "decode / forward | goal | input max / mean diff | score diff |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        for row in syntax["rows"]:
            goal = GOAL_FRACTION.get(syntax_family(row["uid"]), DEFAULT_GOAL_FRACTION)
            fraction = row["after_ms"] / forward
            megapixels = row["decoded_shape"][0] * row["decoded_shape"][1] / 1e6
            lines.append(f"| {row['file'][:40]} | {row['syntax']} | {megapixels:.1f} | {row['before_ms']:.1f} | "
                         f"{row['after_ms']:.1f} | {row['after_decode_ms']:.1f} | {fraction:.3f} | "
                         f"{row['after_decode_ms'] / forward:.3f} | {'meets' if fraction <= goal else 'misses'} ≤ "
                         f"{goal} | {row['input_max_diff']} / {row['input_mean_diff']:.4f} | {row['score_diff']:.1e} |")
    bomb = result.get("bombs")
    if bomb:
        lines += ["", f"Bombs: {bomb['reasons']}; normal file recorded {bomb['normal_recorded_after_s']:.1f} s after "
                  f"its drop; peak RSS of the ingester and its {bomb['processes']} decode processes "
                  f"{bomb['peak_rss_mib']:.0f} MiB (caps: {bomb['processes']} x {bomb['cap_mib']} MiB address space)."]
    return "\n".join(lines)


PARTS = ("throughput", "per-syntax", "bombs")


def main(argv: list[str] | None = None) -> int:
    global PINNED_CPUS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom-dir", type=Path, default=DEFAULT_DICOM_DIR)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default all)")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres",
                        help="postgres (+ Redis, the distributed layout; default) or sqlite (+ the folder broker, the "
                             "embedded default: needs no server)")
    parser.add_argument("--baseline", default="old-decoders",
                        help="per syntax: 'old-decoders' or a git revision whose pipeline to compare with")
    parser.add_argument("--throughput-baseline", metavar="REVISION",
                        help="throughput: also time that git revision's ingester (1 x 1 and 1 x --processes), "
                             "interleaved with this checkout's; it must share this checkout's database schema")
    parser.add_argument("--cpus", help="pin the ingesters and their decode processes to these CPUs, e.g. 0,1 "
                        "(two quiet cores of a larger machine)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if parts - set(PARTS):
        parser.error(f"unknown part(s): {', '.join(sorted(parts - set(PARTS)))}")
    PINNED_CPUS = {int(cpu) for cpu in args.cpus.split(",")} if args.cpus else None
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    configurations = {"1 ingester x 1 process": (1, 1),
                      f"1 ingester x {args.processes} processes": (1, args.processes),
                      f"2 ingesters x {args.processes // 2} process(es)": (2, max(1, args.processes // 2))}
    roots = dict.fromkeys(configurations, REPO_ROOT)
    result: dict[str, Any] = {"database": args.database, "cpus": args.cpus}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        if "throughput" in parts and args.throughput_baseline:
            baseline_root = extract_revision(args.throughput_baseline, workdir)
            for ingesters, processes in ((1, 1), (1, args.processes)):
                label = f"baseline {args.throughput_baseline}: 1 ingester x {processes} process(es)"
                configurations[label], roots[label] = (ingesters, processes), baseline_root
        measured: dict[str, list[dict[str, Any]]] = {label: [] for label in configurations}
        if "throughput" in parts:
            for round_index in range(args.rounds):
                for label, (ingesters, processes) in configurations.items():
                    run = throughput(args.dicom_dir, args.n, ingesters, processes, workdir, args.database,
                                     roots[label])
                    measured[label].append(run)
                    print(f"round {round_index + 1} {label}: {run['files_per_s']:.2f} files/s, CPU ms/file "
                          f"{run['loop_cpu_s_per_file'] * 1000:.1f} loop + {run['decode_cpu_s_per_file'] * 1000:.1f} "
                          "decode, "
                          f"load {run['load']:.1f}", flush=True)
            keys = ("files_per_s", "cpu_s_per_file", "loop_cpu_s_per_file", "decode_cpu_s_per_file", "load")
            result["throughput"] = {label: {key: statistics.median(run[key] for run in values) for key in keys}
                                    for label, values in measured.items()}
            result["throughput_runs"] = measured
        if "bombs" in parts:
            result["bombs"] = bombs(args.dicom_dir, args.processes, 2048, workdir, args.database)
            print(f"bombs: {result['bombs']}", flush=True)
        result["machine"] = describe_machine(with_tensorflow="per-syntax" in parts)  # before per_syntax pins a core
        if "per-syntax" in parts:
            result["per_syntax"] = per_syntax(args.dicom_dir, args.repeats, args.rounds, args.baseline, workdir)
    result["load_before"] = load_before
    result["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
