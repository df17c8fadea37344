"""One validated settings object, read from ``COVID_CXR_*`` environment variables and overridable by flags."""

from __future__ import annotations

import os
import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from covid_cxr.constants import MODEL_NAME
from covid_cxr.errors import ConfigurationError

ENV_PREFIX = "COVID_CXR_"
#: Shortest accepted pseudonym key: 256 bits, the HMAC-SHA256 block of security.
MIN_PSEUDONYM_KEY_BYTES = 32
#: Shortest accepted dashboard token: guessing it must not be practical over the network.
MIN_WEB_TOKEN_CHARS = 16


#: DICOM AE titles: 1 to 16 characters of the default repertoire, no backslash, no control characters.
_AE_TITLE = re.compile(r"^[^\\\x00-\x1f]{1,16}$")


def _ae_title(value: str) -> str:
    title = value.strip()
    if not _AE_TITLE.match(title):
        raise ValueError(f"{value!r} is not a DICOM AE title (1 to 16 characters, no backslash or control characters)")
    return title


class Destination(BaseModel):
    """Where results are sent: a DICOM storage SCP (``ae_title``, ``host``, ``port``) or a ``folder``.

    Written in ``COVID_CXR_DICOM_DESTINATIONS`` as ``NAME=AE@HOST:PORT`` or ``NAME=folder:/PATH``,
    several separated by commas.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    folder: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else _ae_title(value)

    @model_validator(mode="after")
    def _one_kind(self) -> Destination:
        network = [v is not None for v in (self.ae_title, self.host, self.port)]
        if self.folder is not None and any(network):
            raise ValueError(f"destination {self.name}: either AE@HOST:PORT or folder:PATH, not both")
        if self.folder is None and not all(network):
            raise ValueError(f"destination {self.name}: needs AE@HOST:PORT or folder:PATH")
        return self

    @property
    def kind(self) -> Literal["dicom", "folder"]:
        return "folder" if self.folder is not None else "dicom"

    def describe(self) -> str:
        """The destination as it is written in the setting."""
        if self.folder is not None:
            return f"{self.name}=folder:{self.folder}"
        return f"{self.name}={self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``NAME=AE@HOST:PORT`` or ``NAME=folder:/PATH``."""
        name, equals, target = text.strip().partition("=")
        if not equals:
            raise ValueError(f"{text!r}: expected NAME=AE@HOST:PORT or NAME=folder:/PATH")
        target = target.strip()
        if target.startswith("folder:"):
            return cls(name=name.strip(), folder=Path(target.removeprefix("folder:")).expanduser())
        ae_title, at, address = target.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and host and port.isdigit()):
            raise ValueError(f"{text!r}: expected NAME=AE@HOST:PORT or NAME=folder:/PATH")
        return cls(name=name.strip(), ae_title=ae_title, host=host.strip("[]"), port=int(port))


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
    max_file_bytes: int = Field(128 * 1024 * 1024, gt=0, description="Reject files larger than this many bytes "
                                "(too_large) before reading them; a single-frame radiograph, even uncompressed, "
                                "is far smaller")
    multi_frame_policy: Literal["reject", "first_frame"] = Field(
        "reject", description="What to do with multi-frame images: reject them (multi_frame) or read frame 1 only "
        "(flag first_frame_only)")

    # --- quality checks (docs/preprocessing.md#quality-checks) ----------------------------------
    qc_species_policy: Literal["reject", "flag"] = Field(
        "reject", description="A header that describes an animal (species, breed or owner elements, species or "
        "veterinary words): reject (not_human) or flag (qc_species_flagged)")
    qc_described_view_policy: Literal["reject", "flag"] = Field(
        "reject", description="ViewPosition empty and a description or the protocol name says lateral: reject "
        "(lateral_view) or flag (qc_described_view_flagged)")
    qc_polarity_policy: Literal["reject", "flag", "correct"] = Field(
        "correct", description="The image check finds a negative (bones dark): correct (invert it back, flag "
        "qc_polarity_corrected), flag (qc_polarity_flagged) or reject (inverted_image); a finding that is not "
        "confident is only flagged")
    qc_orientation_policy: Literal["reject", "flag", "correct"] = Field(
        "correct", description="The image check finds the image upside down or turned by 90 degrees: correct (turn "
        "it upright, flag qc_orientation_corrected), flag (qc_orientation_flagged) or reject (wrong_orientation); "
        "a finding that is not confident is only flagged")
    qc_frontal_chest_policy: Literal["reject", "flag"] = Field(
        "reject", description="The image check finds no frontal chest radiograph: reject (not_frontal_chest) or flag "
        "(qc_frontal_chest_flagged); a finding that is not confident is only flagged")

    # --- decode processes -----------------------------------------------------------------------
    decode_processes: int = Field(0, ge=0, description="Processes that decode files in parallel for one ingester "
                                  "(and for training); 0: one per CPU core this process may use")
    decode_memory_mb: int = Field(2048, ge=256, description="Address-space limit (RLIMIT_AS) of each decode process "
                                  "in MiB; a file whose decoding needs more is rejected too_large")
    decode_timeout_seconds: float = Field(30.0, gt=0, description="Wall-clock limit for reading one file in a "
                                          "decode process; a file that takes longer is rejected decode_timeout")

    # --- inbox watcher -------------------------------------------------------------------------
    settle_seconds: float = Field(
        2.0, ge=0, description="A file is complete once size and mtime are unchanged this long")
    reconcile_interval_seconds: float = Field(30.0, gt=0, description="Period of the full inbox scan / re-enqueue loop")
    requeue_after_seconds: float = Field(900.0, gt=0, description="Re-enqueue instances still 'queued' after this long")
    batch_timeout_seconds: float = Field(
        120.0, gt=0, description="A batch 'queued' this long without a sign of life (not waiting in the broker, no "
        "heartbeat of a worker running it) is lost: re-sent at the next reconciliation, and shown as overdue")
    use_polling_observer: bool = Field(False, description="Polling observer (network shares) instead of inotify")
    claim_lease_seconds: float = Field(
        60.0, gt=0, description="An ingester whose heartbeat file under INBOX/.claims has not changed this long is "
        "taken as dead, and the others finish the files it claimed; keep it above DECODE_TIMEOUT_SECONDS")
    after_ingest: Literal["archive", "keep", "delete"] = Field(
        "archive", description="What happens to an accepted file: archive (move to the archive), keep (leave in the "
        "inbox) or delete")

    ingest_pause_below_free_mb: int = Field(
        1024, ge=0, description="Ingest pauses (files wait in the inbox) while the file system of the data dir, "
        "archive or quarantine has less free space than this many MiB; 0 never pauses")
    ingest_resume_above_free_mb: int = Field(
        2048, ge=0, description="A paused ingest resumes once every such file system has more free space than this "
        "many MiB; at least the pause level")

    # --- inference -------------------------------------------------------------------------------
    batch_size: int = Field(32, ge=1, le=1024, description="Images per inference batch")
    batch_max_wait_seconds: float = Field(2.0, ge=0, description="Send a partial batch after this wait")
    batch_when_idle: bool = Field(
        True, description="Send a partial batch a quarter of a second after its first image when the ingester holds "
        "no more files and no batch sent earlier is waiting for or in a worker (no instance is 'queued'); false: "
        "partial batches always wait batch_max_wait_seconds")
    inference_queue: str = Field("gpu", description="Celery queue for inference tasks")
    cpu_queue: str = Field("cpu", description="Celery queue for CPU jobs (evaluation)")
    max_attempts: int = Field(3, ge=1, description="Task attempts before an instance ends 'failed'")
    model_name: str = Field(MODEL_NAME, description="Registry name whose active version the workers serve")
    mixed_precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Inference precision of the workers: fp32, or Keras mixed precision bf16 / fp16 "
        "(computed in 16 bit, weights and the model's output in float32)")

    # --- DICOM network: receiving images, sending results --------------------------------------
    dicom_ae_title: str = Field("COVID_CXR", description="AE title of `covid-cxr receive` and of the results sender")
    dicom_port: int | None = Field(None, ge=0, le=65535, description="Port of the C-STORE SCP; unset: `serve` "
                                   "starts no receiver (`receive --port` still works)")
    dicom_bind_address: str = Field("0.0.0.0", description="Address the C-STORE SCP listens on")
    dicom_allowed_callers: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(), description="Calling AE titles allowed to associate, comma-separated; AE@HOST also checks the "
        "caller's address; * allows any AE title. Empty: the receiver does not start")
    dicom_max_associations: int = Field(10, ge=1, description="Concurrent associations the receiver accepts")
    dicom_min_free_mb: int = Field(1024, ge=0, description="Below this much free space in the inbox, C-STORE is "
                                   "answered 0xA700 (out of resources) and nothing is written")
    dicom_timeout_seconds: float = Field(30.0, gt=0, description="ACSE, DIMSE and network timeout, both directions")
    dicom_tls_cert: Path | None = Field(None, description="PEM certificate of the receiver; with dicom_tls_key, "
                                        "the receiver speaks TLS only")
    dicom_tls_key: Path | None = Field(None, description="PEM private key of the receiver")
    dicom_tls_ca: Path | None = Field(None, description="PEM CA bundle; when set, callers must present a "
                                      "certificate it signed")
    dicom_destinations: Annotated[tuple[Destination, ...], NoDecode] = Field(
        (), description="Where results are sent, comma-separated: NAME=AE@HOST:PORT (C-STORE) or "
        "NAME=folder:/PATH. Empty: no SR is made or sent")
    dicom_sr_per_image: bool = Field(False, description="Besides one SR per study, one SR per image")
    delivery_max_attempts: int = Field(10, ge=1, description="Attempts to send an object to a destination before "
                                       "it is dead-lettered")
    delivery_retry_seconds: float = Field(30.0, gt=0, description="Wait after the first failed attempt; doubles "
                                          "each attempt, up to delivery_retry_max_seconds")
    delivery_retry_max_seconds: float = Field(3600.0, gt=0, description="Longest wait between two attempts")
    delivery_poll_seconds: float = Field(2.0, gt=0, description="How often the outbox looks for new results and "
                                         "due deliveries")

    # --- privacy of the data at rest ---------------------------------------------------------------
    data_group: str | None = Field(
        None, description="Group (name or number) that may read the data dir and the embedded database, e.g. "
                          "analysts; default none: everything the service stores is private to its own user")

    # --- evaluation ------------------------------------------------------------------------------
    evaluation_cron: str = Field(
        "0 2 * * *", description="celery beat crontab (m h dom mon dow) of the nightly evaluation")

    # --- dashboard, metrics and health endpoints -------------------------------------------------
    web_host: str = Field("127.0.0.1", description="Interface the dashboard (covid-cxr web, serve) and the probe "
                          "endpoints of ingest and worker listen on; any other than loopback needs "
                          "COVID_CXR_WEB_TOKEN")
    web_port: int = Field(8080, ge=0, le=65535, description="Port of the dashboard of covid-cxr web and serve "
                          "(0: any free port, logged)")
    web_token: SecretStr | None = Field(None, description="Token every request to the dashboard and the probe "
                                        "endpoints must carry (Authorization: Bearer TOKEN, or as the password of "
                                        "HTTP basic auth); required to listen on a non-loopback interface")
    web_explain: bool = Field(True, description="The dashboard makes a Grad-CAM heatmap on request "
                              "(/images/ID/explain.png) with the model version that scored the image: TensorFlow "
                              "and that model are loaded into the dashboard's process (web, or serve) on the first "
                              "request, one model kept; false keeps TensorFlow out of it and answers 404")
    probe_port: int | None = Field(None, ge=0, le=65535, description="Port of the /healthz, /readyz and /metrics "
                                   "endpoint of covid-cxr ingest and covid-cxr worker (unset: none; 0: any free "
                                   "port, logged); serve answers them on the dashboard's port")
    task_events: bool = Field(False, description="Workers send Celery task events and heartbeats, and producers "
                              "task-sent events, for Flower (celery -A worker.app flower)")

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

    @field_validator("web_token")
    @classmethod
    def _long_enough_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_WEB_TOKEN_CHARS:
            raise ValueError(f"must be at least {MIN_WEB_TOKEN_CHARS} characters, e.g. the output of "
                             f"`openssl rand -hex 16`")
        return value

    @field_validator("ingest_resume_above_free_mb")
    @classmethod
    def _resume_not_below_pause(cls, value: int, info: ValidationInfo) -> int:
        pause = info.data.get("ingest_pause_below_free_mb")
        if pause is not None and value < pause:
            raise ValueError(f"must be at least COVID_CXR_INGEST_PAUSE_BELOW_FREE_MB ({pause}): ingest resumes above "
                             f"the level it pauses below, or it would pause and resume on every file")
        return value

    @field_validator("evaluation_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("must have five fields: minute hour day-of-month month day-of-week")
        return value

    @field_validator("dicom_ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("dicom_allowed_callers", mode="before")
    @classmethod
    def _split_callers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        callers = frozenset(str(v).strip() for v in value)
        for caller in callers - {"*"}:
            _ae_title(caller.rpartition("@")[0] if "@" in caller else caller)
        return callers

    @field_validator("dicom_destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [Destination.parse(part) for part in value.split(",") if part.strip()]
        destinations = tuple(v if isinstance(v, Destination) else Destination.model_validate(v) for v in value)
        names = [d.name for d in destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        return destinations

    @field_validator("dicom_tls_key")
    @classmethod
    def _tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if (value is None) != (info.data.get("dicom_tls_cert") is None):
            raise ValueError("set both COVID_CXR_DICOM_TLS_CERT and COVID_CXR_DICOM_TLS_KEY, or neither")
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
    def decode_process_count(self) -> int:
        """``decode_processes``, with 0 resolved to the number of CPU cores this process may run on."""
        return self.decode_processes or len(os.sched_getaffinity(0))

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
