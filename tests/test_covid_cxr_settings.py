"""The settings object: validated at start-up, with clear messages naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from covid_cxr.errors import ConfigurationError
from covid_cxr.settings import MIN_PSEUDONYM_KEY_BYTES, load_settings


def test_a_short_pseudonym_key_is_refused_with_the_variable_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="COVID_CXR_PSEUDONYM_KEY: .*at least 32 bytes"):
        load_settings(data_dir=tmp_path, pseudonym_key="a")


def test_a_key_of_32_bytes_is_used_as_given(tmp_path: Path) -> None:
    key = "k" * MIN_PSEUDONYM_KEY_BYTES
    assert load_settings(data_dir=tmp_path, pseudonym_key=key).pseudonym_secret == key.encode()


def test_without_a_key_one_is_created_once_private_to_the_service(tmp_path: Path) -> None:
    first = load_settings(data_dir=tmp_path).pseudonym_secret
    key_file = tmp_path / "pseudonym.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(first) >= MIN_PSEUDONYM_KEY_BYTES
    assert load_settings(data_dir=tmp_path).pseudonym_secret == first


def test_a_short_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pseudonym.key").write_text("short\n")
    with pytest.raises(ConfigurationError, match="fewer than 32 bytes"):
        _ = load_settings(data_dir=tmp_path).pseudonym_secret


def test_an_ephemeral_key_writes_no_file(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path).with_ephemeral_pseudonym_key()
    assert len(settings.pseudonym_secret) >= MIN_PSEUDONYM_KEY_BYTES
    assert not (tmp_path / "pseudonym.key").exists()
