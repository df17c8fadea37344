"""The schema: studies, instances, quality checks, normalized images, predictions, study results, models, labels,
reports."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column, relationship

UID = String(64)  # DICOM UIDs are at most 64 characters
SHA256 = String(64)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


#: Which instance rows are *primary* (the one row of a SOPInstanceUID that duplicates and conflicts point
#: at): accepted rows only, so that a rejected copy (truncated mid-write) never blocks a complete one.
PRIMARY_ROW_PREDICATE = "duplicate_of_id IS NULL AND sop_instance_uid IS NOT NULL AND state <> 'rejected'"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class InstanceState(enum.StrEnum):
    """Life cycle of one received file: received -> queued -> predicted | rejected | duplicate | failed."""

    received = "received"
    queued = "queued"
    predicted = "predicted"
    rejected = "rejected"
    duplicate = "duplicate"
    failed = "failed"

    @property
    def terminal(self) -> bool:
        return self in {InstanceState.predicted, InstanceState.rejected, InstanceState.duplicate, InstanceState.failed}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64), index=True, doc="HMAC-SHA256 of PatientID")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Instance(Base):
    """One received file. Duplicates and conflicts are rows too, so every file dropped is accounted for."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default=InstanceState.received)
    reason: Mapped[str | None] = mapped_column(String(64), index=True, doc="stable reason code when rejected/failed")
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    file_name: Mapped[str] = mapped_column(Text, doc="path relative to the inbox when it was found")
    file_sha256: Mapped[str] = mapped_column(SHA256, index=True)
    file_size: Mapped[int | None] = mapped_column(Integer)
    stored_path: Mapped[str | None] = mapped_column(
        Text, doc="where the file went: archive/quarantine path, or null if deleted (or purged)")

    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    institution_name: Mapped[str | None] = mapped_column(String(64))
    patient_sex: Mapped[str | None] = mapped_column(String(1), doc="PatientSex M/F/O, for subgroup reports")
    age_band: Mapped[str | None] = mapped_column(String(8), doc="age as a decade band ('60-69'), never the age")
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(UID)
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    flags: Mapped[list[Any] | None] = mapped_column(JSON, doc="e.g. ['view_unknown']")

    duplicate_of_id: Mapped[int | None] = mapped_column(
        ForeignKey("instances.id"), doc="the first instance with this SOPInstanceUID (duplicate or conflict)")
    conflict: Mapped[bool] = mapped_column(Boolean, default=False, doc="same SOPInstanceUID, different content")
    batch_id: Mapped[str | None] = mapped_column(String(64), index=True)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    purged_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), doc="when `covid-cxr purge` deleted the archived or quarantined file")

    study: Mapped[Study | None] = relationship(back_populates="instances")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="instance")

    __table_args__ = (
        # One primary row per SOPInstanceUID; duplicates/conflicts point at it. Guards concurrent ingesters.
        # A file the reader rejected (cut short by its writer, say) is no primary: a good copy may follow.
        Index(
            "uq_instances_primary_sop_instance_uid",
            "sop_instance_uid",
            unique=True,
            sqlite_where=text(PRIMARY_ROW_PREDICATE),
            postgresql_where=text(PRIMARY_ROW_PREDICATE),
        ),
    )


class QualityCheckRecord(Base):
    """One quality check's outcome for one instance (image checks always, header rules when they fire).

    ``decision``: pass, flag, correct or reject; ``score``: the model's probability of the finding
    (image checks); ``version``: of the quality model or the header rules that decided.
    """

    __tablename__ = "quality_checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), index=True)
    check_name: Mapped[str] = mapped_column(String(32), doc="species | described_view | polarity | orientation | "
                                                           "frontal_chest")
    decision: Mapped[str] = mapped_column(String(16), index=True, doc="pass | flag | correct | reject")
    finding: Mapped[str | None] = mapped_column(String(32), doc="e.g. inverted, upside_down, not_human")
    score: Mapped[float | None] = mapped_column(Float)
    confident: Mapped[bool] = mapped_column(Boolean)
    action: Mapped[str | None] = mapped_column(String(64), doc="what was done to the image (decision correct)")
    evidence: Mapped[str | None] = mapped_column(Text, doc="the header element a rule decided on")
    version: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("instance_id", "check_name", name="uq_quality_checks_instance_check"),)


class NormalizedImage(Base):
    """The 224x224 uint8 model input (PNG-encoded), so workers need only the database, never the inbox."""

    __tablename__ = "normalized_images"

    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True)
    preprocessing_version: Mapped[str] = mapped_column(String(32))
    png: Mapped[bytes | None] = mapped_column(LargeBinary, doc="null once purged (covid-cxr purge --images)")
    mean: Mapped[float | None] = mapped_column(Float, doc="pixel mean 0..255, for drift monitoring")
    std: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), doc="when the PNG was dropped")


class ModelVersion(Base):
    """A registered model artifact; the .keras bytes live here so any worker can fetch and verify them."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(SHA256)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), doc="when it was last activated")
    activated_by: Mapped[str | None] = mapped_column(Text, doc="the command that last activated it, and who ran it")
    threshold_override: Mapped[float | None] = mapped_column(
        Float, doc="decision threshold set at activation (models activate --threshold); null: the metadata's")
    threshold_set_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    threshold_set_by: Mapped[str | None] = mapped_column(Text, doc="the command that set the override, and who ran it")
    metadata_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifact: Mapped[bytes] = deferred(mapped_column(LargeBinary))

    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_models_name_version"),
        Index("uq_models_one_active_per_name", "name", unique=True,
              sqlite_where=text("active"), postgresql_where=text("active")),
    )


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    model_version: Mapped[str] = mapped_column(String(64))
    preprocessing_version: Mapped[str] = mapped_column(String(32))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON, doc='{"covid": p, "normal": 1-p}')
    prob_covid: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    batch_size: Mapped[int | None] = mapped_column(Integer)
    inference_ms: Mapped[float | None] = mapped_column(Float, doc="batch forward time / batch size")
    queued_ms: Mapped[float | None] = mapped_column(Float, doc="file found -> prediction written")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)

    instance: Mapped[Instance] = relationship(back_populates="predictions")

    __table_args__ = (UniqueConstraint("instance_id", "model_version", name="uq_predictions_instance_model"),)


class StudyResult(Base):
    """Study-level aggregate over the study's frontal images (rule documented in the README)."""

    __tablename__ = "study_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    n_images: Mapped[int] = mapped_column(Integer)
    prob_covid: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    rule: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    __table_args__ = (UniqueConstraint("study_id", "model_version", name="uq_study_results_study_model"),)


class GroundTruthLabel(Base):
    """A true label (RT-PCR, radiologist read) keyed by a DICOM identifier."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_type: Mapped[str] = mapped_column(String(32), doc="study_instance_uid | sop_instance_uid | accession_number")
    key_value: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(64), doc="e.g. rt-pcr, radiologist")
    label_date: Mapped[str | None] = mapped_column(String(10))
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    __table_args__ = (UniqueConstraint("key_type", "key_value", "source", name="uq_labels_key_source"),)


class LabelChange(Base):
    """History of a label that changed on re-import."""

    __tablename__ = "label_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id"), index=True)
    old_label: Mapped[str] = mapped_column(String(16))
    new_label: Mapped[str] = mapped_column(String(16))
    file_name: Mapped[str | None] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EvaluationReport(Base):
    __tablename__ = "evaluation_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    window: Mapped[str] = mapped_column(String(16), doc="24h | 7d | 30d | all")
    window_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    period: Mapped[str] = mapped_column(String(32), doc="identity of the window: its end date for rolling windows")
    model_version: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(8), doc="image | study")
    n: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    text_report: Mapped[str] = mapped_column(Text)
    flags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    plot_paths: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    html_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("window", "period", "model_version", "level", name="uq_evaluation_reports_window_model"),
    )


class StuckFile(Base):
    """An inbox entry that cannot be processed yet (unreadable, not a regular file, a name the file system
    refuses...), with its cause: what ``status`` lists so that nothing loops invisibly. Gone once resolved."""

    __tablename__ = "stuck_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_name: Mapped[str] = mapped_column(Text, unique=True, doc="inbox-relative name, undecodable bytes escaped")
    cause: Mapped[str] = mapped_column(String(64), doc="reason code, e.g. not_a_regular_file, unreadable")
    message: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    ingester: Mapped[str] = mapped_column(String(255), doc="host:pid of the ingester that last tried")
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeliveryState(enum.StrEnum):
    """Life cycle of one object for one destination: pending -> delivered | dead (after the last attempt)."""

    pending = "pending"
    delivered = "delivered"
    dead = "dead"


class ResultDocument(Base):
    """A DICOM object made from a result (a Structured Report), kept as sent; a changed result is a new version.

    ``document_key`` names one document across its versions (``study:<StudyInstanceUID>``, or
    ``image:<SOPInstanceUID>`` for per-image reports); each version references the one before it
    (``predecessor_id``, and the Predecessor Documents Sequence in the object itself).
    """

    __tablename__ = "result_documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_key: Mapped[str] = mapped_column(String(80), doc="study:<StudyInstanceUID> | image:<SOPInstanceUID>")
    version: Mapped[int] = mapped_column(Integer, doc="1, 2, ... within the document_key")
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("result_documents.id"))
    kind: Mapped[str] = mapped_column(String(16), doc="study | image")
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True,
                                                    doc="the image of a per-image report")
    model_version: Mapped[str] = mapped_column(String(64))
    prob_covid: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    n_images: Mapped[int] = mapped_column(Integer, doc="images the finding was taken over (referenced)")
    content_sha256: Mapped[str] = mapped_column(SHA256, doc="of what the report says; unchanged -> no new version")
    result_updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True),
                                                        doc="the result's updated_at this document reflects")
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    dataset: Mapped[bytes] = deferred(mapped_column(LargeBinary, doc="the DICOM file (Part 10) as sent"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("document_key", "version", name="uq_result_documents_key_version"),)


class Delivery(Base):
    """The outbox: one row per document and destination, retried with backoff, dead-lettered after the last attempt."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("result_documents.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), doc="a name from COVID_CXR_DICOM_DESTINATIONS")
    state: Mapped[str] = mapped_column(String(16), index=True, default=DeliveryState.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True,
                                                      doc="due time; also the claim of a sender at work")
    reason: Mapped[str | None] = mapped_column(String(64), doc="reason code of the last failed attempt")
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("document_id", "destination", name="uq_deliveries_document_destination"),)


class IngestStatus(Base):
    """One row per running ingester: whether it pauses for lack of disk space, written by the ingester itself."""

    __tablename__ = "ingest_status"

    name: Mapped[str] = mapped_column(String(255), primary_key=True, doc="host:inbox of the ingester")
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    paused_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    free_bytes: Mapped[int | None] = mapped_column(BigInteger, doc="least free space of the watched file systems")
    disk_path: Mapped[str | None] = mapped_column(Text, doc="the folder on the file system with the least free space")
    message: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
