"""Shared fixtures: real data, real PostgreSQL and Redis, or a plain skip message saying what was not run.

With ``CI=true`` nothing may be skipped for a missing service or missing data: the fixture fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest_plugins = ["service_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_candidates() -> list[Path]:
    """Where the shared data may be: ``COVID_CXR_SHARED_DATA`` alone if set; else ``../shared/data`` beside this
    checkout, then beside the repository this checkout was cloned from when that is a local folder (a fresh
    ``git clone`` of a working checkout into a temporary folder has no ``../shared`` of its own)."""
    if "COVID_CXR_SHARED_DATA" in os.environ:
        return [Path(os.environ["COVID_CXR_SHARED_DATA"])]
    candidates = [REPO_ROOT.parent / "shared" / "data"]
    try:
        origin = subprocess.run(["git", "-C", str(REPO_ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout: only the first place
        origin = ""
    if origin and "://" not in origin and ":" not in origin.split("/")[0] and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "data")
    return candidates


def _shared_data() -> Path:
    candidates = _shared_data_candidates()
    return next((path for path in candidates if (path / "dicom" / "manifest.csv").exists()), candidates[0])


SHARED_DATA = _shared_data()
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

POSTGRES_ADMIN_URL = os.environ.get("COVID_CXR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("COVID_CXR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

_missing_services: set[str] = set()


def _unavailable(what: str) -> None:
    """Skip, or fail under CI where every test must run."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI (CI=true) but is unavailable")
    _missing_services.add(what)
    pytest.skip(f"{what} unavailable: this test was NOT run (its embedded twin still runs)")


def _port_open(url: str, default_port: int) -> bool:
    parsed = urlparse(url.replace("+psycopg", ""))
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real chest X-rays and DICOM files)."""
    if not (SHARED_DATA / "dicom" / "manifest.csv").exists():
        _unavailable(f"shared data at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "dicom"


@pytest.fixture(scope="session")
def cxr_dir(shared_data: Path) -> Path:
    return shared_data / "cxr"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if not _port_open(POSTGRES_ADMIN_URL, 5432):
        _unavailable("PostgreSQL")
    import sqlalchemy as sa

    name = f"covid_cxr_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Runs a test on both databases: ``None`` (the data folder's SQLite file), then a fresh PostgreSQL database."""
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else None


@pytest.fixture
def redis_url() -> str:
    """A real Redis database index reserved for tests, emptied before use."""
    if not _port_open(REDIS_TEST_URL, 6379):
        _unavailable("Redis")
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    client.close()
    return REDIS_TEST_URL


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _missing_services:
        terminalreporter.write_line(
            "SKIPPED because unavailable here (embedded twins ran instead): " + ", ".join(sorted(_missing_services)),
            yellow=True,
        )
