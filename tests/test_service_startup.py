"""Start-up of the long-running commands: the data dir is made private, or shared with the analysts' group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from covid_cxr.errors import ConfigurationError
from covid_cxr.settings import load_settings
from db.migrate import upgrade
from service.startup import secure_data_dir


@pytest.fixture
def loose_install(tmp_path: Path) -> Path:
    """A data dir left world-readable by an earlier version or an operator's umask."""
    data_dir = tmp_path / "data"
    upgrade(load_settings(data_dir=data_dir))
    os.chmod(data_dir, 0o755)
    os.chmod(data_dir / "covid-cxr.sqlite3", 0o644)
    return data_dir


def test_the_data_dir_and_the_database_become_private(loose_install: Path) -> None:
    secure_data_dir(load_settings(data_dir=loose_install))
    assert loose_install.stat().st_mode & 0o777 == 0o700
    assert (loose_install / "covid-cxr.sqlite3").stat().st_mode & 0o777 == 0o600


def test_a_configured_group_may_read_but_not_write(loose_install: Path) -> None:
    before = os.umask(0o077)
    try:
        secure_data_dir(load_settings(data_dir=loose_install, data_group=str(os.getgid())))
        assert os.umask(0o077) == 0o027, "files created from now on are group-readable"
    finally:
        os.umask(before)
    info = loose_install.stat()
    assert (info.st_mode & 0o777, info.st_gid) == (0o750, os.getgid())
    assert (loose_install / "covid-cxr.sqlite3").stat().st_mode & 0o777 == 0o640


def test_an_unknown_group_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="COVID_CXR_DATA_GROUP"):
        secure_data_dir(load_settings(data_dir=tmp_path, data_group="no-such-group-here"))


@pytest.mark.parametrize("argv", [
    ["deliver"],  # stops at once: no destination configured
    ["worker", "--queues", "gpu"],  # stops at the schema check: the database was never created
    ["receive", "--port", "104", "--bind", "203.0.113.1"],  # stops when it cannot listen on that address
])
def test_every_command_that_touches_phi_makes_the_data_dir_private_first(argv: list[str], tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import main

    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    monkeypatch.setenv("COVID_CXR_DATA_DIR", str(data_dir))
    monkeypatch.delenv("COVID_CXR_DATABASE_URL", raising=False)
    monkeypatch.delenv("COVID_CXR_DICOM_DESTINATIONS", raising=False)
    assert main(argv) != 0  # each fails early, by design of the arguments
    assert data_dir.stat().st_mode & 0o777 == 0o700
