"""The ``covid-cxr`` entry point: quiet on expected failures, on a closed pipe, and private by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

J2K_CHEST = "pydicom-data__RG1_J2KI.dcm"


@pytest.fixture
def undecodable_j2k(dicom_dir: Path, tmp_path: Path) -> Path:
    """The NEMA chest with its JPEG 2000 coding-style (COD) marker segment wiped: openjpeg cannot read it."""
    data = bytearray((dicom_dir / J2K_CHEST).read_bytes())
    start = data.index(b"\xff\x4f\xff\x51")  # SOC then SIZ: the codestream
    cod = data.index(b"\xff\x52", start)
    data[cod:cod + 40] = bytes(40)
    path = tmp_path / "undecodable.dcm"
    path.write_bytes(bytes(data))
    return path


def _covid_cxr(*args: str, cwd: Path, close_stdout: bool = False) -> tuple[int, str]:
    process = subprocess.Popen([sys.executable, "-m", "covid_cxr", *args], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert process.stdout is not None and process.stderr is not None
    if close_stdout:
        process.stdout.close()  # the reader went away, as `| head` does
        err = process.stderr.read()
    else:
        _, err = process.communicate(timeout=120)
    return process.wait(timeout=120), err.decode(errors="replace")


def test_an_undecodable_file_is_a_quiet_rejection_not_a_traceback(undecodable_j2k: Path, tmp_path: Path) -> None:
    code, err = _covid_cxr("inspect", str(undecodable_j2k), "--json", cwd=tmp_path)
    assert code == 0
    assert "Traceback" not in err and " ERROR " not in err
    assert "reason=decode_failed" in err  # the one rejection line stays
    assert "\n" not in err.strip()  # one line per problem


def test_a_closed_stdout_ends_the_command_quietly(undecodable_j2k: Path, tmp_path: Path) -> None:
    code, err = _covid_cxr("inspect", str(undecodable_j2k), "--json", cwd=tmp_path, close_stdout=True)
    assert code == 141  # 128 + SIGPIPE, what a shell expects of a writer whose reader left
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_files_the_commands_create_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    code, err = _covid_cxr("db", "upgrade", "--data-dir", str(data_dir), cwd=tmp_path)
    assert code == 0, err
    database = data_dir / "covid-cxr.sqlite3"
    assert database.stat().st_mode & 0o077 == 0
    assert data_dir.stat().st_mode & 0o077 == 0
