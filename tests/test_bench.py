"""The benchmarks in ``bench/`` still start: each parses its options, and the helpers they stage files with work.

Benchmarks are not run here (they take minutes and their figures belong to a quiet machine); this only keeps the
documented commands from breaking unnoticed when the code they import moves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(path.name for path in (REPO_ROOT / "bench").glob("bench_*.py"))


def _python(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", BENCHES)
def test_every_benchmark_parses_its_options(script: str) -> None:
    done = _python(f"bench/{script}", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


@pytest.mark.parametrize(("module", "call", "count"), [
    ("bench_ingest", "stage", 3),
    ("bench_pipeline", "stage_files", 2),
])
def test_the_benchmarks_stage_fresh_copies_of_the_shared_chest_files(module: str, call: str, count: int,
                                                                     dicom_dir: Path, tmp_path: Path) -> None:
    # Each in a process of its own, as the script runs: one benchmark's path set-up must not serve another's.
    code = (f"import sys; from pathlib import Path; sys.path.insert(0, 'bench'); import {module}\n"
            f"print(len({module}.{call}(Path({str(dicom_dir)!r}), {count}, Path({str(tmp_path / 'out')!r}))))")
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(count)]
    import pydicom

    uids = {pydicom.dcmread(path).SOPInstanceUID for path in (tmp_path / "out").iterdir()}
    assert len(uids) == count  # every copy is a new instance


def test_the_ingest_table_compares_each_row_with_one_process_of_the_same_code() -> None:
    """A baseline revision's rows are its own ratios: against this checkout's one process they would mix two codes."""
    def run(files_per_s: float) -> dict[str, float]:
        return {"files_per_s": files_per_s, "loop_cpu_s_per_file": 0.004, "decode_cpu_s_per_file": 0.037}

    runs = {"1 ingester x 1 process": run(20.0), "1 ingester x 2 processes": run(36.0),
            "baseline abc123: 1 ingester x 1 process(es)": run(25.0),
            "baseline abc123: 1 ingester x 2 process(es)": run(45.0)}
    result = {"load_before": 0, "load_after": 0, "database": "sqlite", "cpus": None, "throughput": runs,
              "throughput_runs": {label: [run] for label, run in runs.items()}}
    code = ("import sys; sys.path.insert(0, 'bench'); import bench_ingest\n"
            f"print(bench_ingest.markdown({{**{result!r}, 'machine': bench_ingest.describe_machine(False)}}))")
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[2] for line in done.stdout.splitlines()
              if line.startswith("| ") and "x " in line}
    assert ratios == {"1 ingester x 1 process": "1.00", "1 ingester x 2 processes": "1.80",
                      "baseline abc123: 1 ingester x 1 process(es)": "1.00",
                      "baseline abc123: 1 ingester x 2 process(es)": "1.80"}
    assert "| 4.0 + 37.0 |" in done.stdout
