"""One validated settings object, read from ``COVID_CXR_*`` environment variables and overridable by flags."""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from covid_cxr.constants import MODEL_NAME
from covid_cxr.errors import ConfigurationError

ENV_PREFIX = "COVID_CXR_"
#: Shortest accepted pseudonym key: 256 bits, the HMAC-SHA256 block of security.
MIN_PSEUDONYM_KEY_BYTES = 32


class Settings(BaseSettings):
    """Everything an operator can configure. Defaults are the embedded mode (SQLite, no-server broker).

    Paths left unset are derived from ``data_dir`` so that one flag relocates a whole installation.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- where things live ---------------------------------------------------------------
    data_dir: Path = Field(
        Path("covid-cxr-data"), description="Root for database, inbox, archive, quarantine, reports, models")
    inbox_dir: Path | None = Field(None, description="Watched drop folder; default DATA_DIR/inbox")
    archive_dir: Path | None = Field(None, description="Where processed files go; default DATA_DIR/archive")
    quarantine_dir: Path | None = Field(None, description="Where rejected files go; default DATA_DIR/quarantine")
    reports_dir: Path | None = Field(None, description="Evaluation reports and plots; default DATA_DIR/reports")
    model_cache_dir: Path | None = Field(
        None, description="Local cache of verified model artifacts; default DATA_DIR/models")

    # --- services --------------------------------------------------------------------------
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/covid-cxr.sqlite3. "
                                     "PostgreSQL: postgresql+psycopg://user@host/db")
    broker_url: str | None = Field(None, description="Celery broker; default a filesystem broker under DATA_DIR/broker "
                                   "(no server). Distributed: redis://host:6379/0")

    # --- privacy -----------------------------------------------------------------------------
    pseudonym_key: SecretStr | None = Field(None, description="HMAC key for patient-id pseudonyms, at least 32 bytes "
                                            "(openssl rand -hex 32); default a random key created once in "
                                            "DATA_DIR/pseudonym.key. Set it explicitly when several ingesters must "
                                            "agree.")

    # --- DICOM acceptance policy -------------------------------------------------------------
    allowed_modalities: Annotated[frozenset[str], NoDecode] = Field(
        frozenset({"CR", "DX"}), description="Modalities accepted as chest radiographs (comma- or space-separated)")
    max_pixels: int = Field(60_000_000, gt=0, description="Reject images whose Rows*Columns*NumberOfFrames exceeds "
                            "this (decompression-bomb guard)")
    multi_frame_policy: Literal["reject", "first_frame"] = Field(
        "reject", description="What to do with multi-frame images: reject them (multi_frame) or read frame 1 only "
        "(flag first_frame_only)")

    # --- inbox watcher -------------------------------------------------------------------------
    settle_seconds: float = Field(
        2.0, ge=0, description="A file is complete once size and mtime are unchanged this long")
    reconcile_interval_seconds: float = Field(30.0, gt=0, description="Period of the full inbox scan / re-enqueue loop")
    requeue_after_seconds: float = Field(900.0, gt=0, description="Re-enqueue instances still 'queued' after this long")
    use_polling_observer: bool = Field(False, description="Polling observer (network shares) instead of inotify")
    after_ingest: Literal["archive", "keep", "delete"] = Field(
        "archive", description="What happens to an accepted file: archive (move to the archive), keep (leave in the "
        "inbox) or delete")

    # --- inference -------------------------------------------------------------------------------
    batch_size: int = Field(32, ge=1, le=1024, description="Images per inference batch")
    batch_max_wait_seconds: float = Field(2.0, ge=0, description="Send a partial batch after this wait")
    inference_queue: str = Field("gpu", description="Celery queue for inference tasks")
    cpu_queue: str = Field("cpu", description="Celery queue for CPU jobs (evaluation)")
    max_attempts: int = Field(3, ge=1, description="Task attempts before an instance ends 'failed'")
    model_name: str = Field(MODEL_NAME, description="Registry name whose active version the workers serve")

    # --- evaluation ------------------------------------------------------------------------------
    evaluation_cron: str = Field(
        "0 2 * * *", description="celery beat crontab (m h dom mon dow) of the nightly evaluation")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the Celery worker (covid-cxr worker --loglevel overrides it)")

    @field_validator("allowed_modalities", mode="before")
    @classmethod
    def _split_modalities(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.replace(",", " ").split()]
        return frozenset(str(v).strip().upper() for v in value)

    @field_validator("pseudonym_key")
    @classmethod
    def _enough_key_material(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_PSEUDONYM_KEY_BYTES:
            raise ValueError(f"must hold at least {MIN_PSEUDONYM_KEY_BYTES} bytes of key material, e.g. "
                             f"the output of `openssl rand -hex 32`; a short key lets anyone who can guess it "
                             f"link pseudonyms back to patient ids")
        return value

    @field_validator("evaluation_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("must have five fields: minute hour day-of-month month day-of-week")
        return value

    # --- derived values ----------------------------------------------------------------------
    def _under_data(self, value: Path | None, name: str) -> Path:
        return (value if value is not None else self.data_dir / name).expanduser()

    @property
    def inbox(self) -> Path:
        return self._under_data(self.inbox_dir, "inbox")

    @property
    def archive(self) -> Path:
        return self._under_data(self.archive_dir, "archive")

    @property
    def quarantine(self) -> Path:
        return self._under_data(self.quarantine_dir, "quarantine")

    @property
    def reports(self) -> Path:
        return self._under_data(self.reports_dir, "reports")

    @property
    def model_cache(self) -> Path:
        return self._under_data(self.model_cache_dir, "models")

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'covid-cxr.sqlite3').expanduser().resolve()}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def embedded_broker(self) -> bool:
        return self.broker.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").expanduser().resolve()

    @property
    def pseudonym_key_file(self) -> Path:
        """Where the key lives when none is configured: created once per data dir."""
        return self.data_dir.expanduser() / "pseudonym.key"

    def with_ephemeral_pseudonym_key(self) -> Settings:
        """These settings with a random key of their own, for one-off reads that keep no pseudonym (no key file)."""
        return self.model_copy(update={"pseudonym_key": SecretStr(secrets.token_hex(32))})

    @cached_property
    def pseudonym_secret(self) -> bytes:
        """The HMAC key; created once per data dir (mode 0600) when none is configured."""
        if self.pseudonym_key is not None:
            return self.pseudonym_key.get_secret_value().encode()
        key_file = self.pseudonym_key_file
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
        secret = key_file.read_text().strip().encode()
        if len(secret) < MIN_PSEUDONYM_KEY_BYTES:
            raise ConfigurationError(f"the pseudonym key file {key_file} holds fewer than {MIN_PSEUDONYM_KEY_BYTES} "
                                     f"bytes; replace it with the output of `openssl rand -hex 32`")
        return secret


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment plus explicit overrides (flags); ``None`` overrides are ignored.

    Raises :class:`ConfigurationError` with every invalid field named.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigurationError(f"invalid configuration: {problems}") from exc
    except SettingsError as exc:
        raise ConfigurationError(f"invalid configuration: {exc}") from exc
