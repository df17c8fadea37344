"""Documents from results: find study (and image) results without an up-to-date report, make one, queue its deliveries.

A result needs a report when no document of its ``document_key`` reflects its ``updated_at``
yet. What the report would say (model, probability, Yes/No, threshold, the referenced images and
theirs) is hashed; when the hash equals the latest version's, nothing new is made (an oblique
film arriving in a study touches its result but changes nothing: only frontal views count).
Otherwise the next version is made, referencing the previous one, and stored with one
``deliveries`` row per configured destination, all in one transaction. Two makers racing for
the same document collide on the unique ``(document_key, version)``; the loser rolls back and
moves on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from covid_cxr import __version__
from covid_cxr.constants import FRONTAL_VIEWS
from covid_cxr.errors import CovidCxrError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    ModelVersion,
    Prediction,
    ResultDocument,
    Study,
    StudyResult,
)
from db.session import session_scope
from delivery.content import Finding, Provenance
from delivery.outbox import study_result_reported
from delivery.sr import (
    IMAGE_SERIES_NUMBER,
    STUDY_SERIES_NUMBER,
    build_report,
    from_bytes,
    read_source_header,
    to_bytes,
)

log = logging.getLogger(__name__)

Kind = Literal["study", "image"]
#: The study rules of :func:`worker.tasks.aggregate_study` (``study_results.rule``): which images a study result's
#: maximum was taken over, and so which images its report references.
_RULE_COUNTS: dict[str, Callable[[str], bool]] = {
    "max_frontal": lambda view: view in FRONTAL_VIEWS,
    "max_view_unknown": lambda view: view == "",
}


def _any_view(view: str) -> bool:
    return True


#: Results looked at per pass; the rest wait for the next pass.
RESULTS_PER_PASS = 50


@dataclass(frozen=True)
class EvaluatedImage:
    """An image a result was taken over, with its own prediction and where its DICOM file is archived."""

    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    view_position: str
    prob_covid: float
    threshold: float
    model_id: int | None
    stored_path: str | None


@dataclass(frozen=True)
class PendingResult:
    """A study or image result that has no document reflecting its latest state."""

    kind: Kind
    study_id: int
    study_instance_uid: str
    instance_id: int | None
    model_version: str
    rule: str | None
    prob_covid: float
    label: str
    threshold: float
    updated_at: datetime
    images: tuple[EvaluatedImage, ...]

    @property
    def document_key(self) -> str:
        if self.kind == "image":
            return f"image:{self.images[0].sop_instance_uid}"
        return f"study:{self.study_instance_uid}"

    def content_sha256(self) -> str:
        """A hash of everything the report states; equal hashes mean an identical report."""
        content = {
            "kind": self.kind, "model_version": self.model_version, "rule": self.rule,
            "prob_covid": round(self.prob_covid, 6), "label": self.label, "threshold": self.threshold,
            "images": [(image.sop_instance_uid, round(image.prob_covid, 6)) for image in self.images],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@dataclass
class MakeReport:
    """What one pass of :meth:`DocumentMaker.run_once` did."""

    made: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: dict[str, str] = field(default_factory=dict)


class DocumentMaker:
    """Makes the missing documents; a result whose source files cannot be read is retried after a backoff."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        #: document_key -> (monotonic time before which it is not tried again, failures so far)
        self._waiting: dict[str, tuple[float, int]] = {}

    def run_once(self, now: datetime | None = None) -> MakeReport:
        now = now or _utcnow()
        report = MakeReport()
        clock = self._clock()
        waiting = {key for key, (not_before, _) in self._waiting.items() if clock < not_before}
        with session_scope(self.settings) as session:
            pending = stale_study_results(session, RESULTS_PER_PASS, waiting)
            if self.settings.dicom_sr_per_image:
                pending += stale_image_results(session, RESULTS_PER_PASS, waiting)
        for result in pending:
            key = result.document_key
            try:
                made = self._make(result, now)
            except SourceUnavailable as exc:
                report.failed[key] = exc.message
                self._back_off(key, exc.message)
                continue
            self._waiting.pop(key, None)
            if made:
                report.made.append(made)
            else:
                report.unchanged += 1
        return report

    def _back_off(self, key: str, message: str) -> None:
        failures = self._waiting.get(key, (0.0, 0))[1] + 1
        delay = min(self.settings.delivery_retry_max_seconds,
                    self.settings.delivery_retry_seconds * 2 ** (failures - 1))
        self._waiting[key] = (self._clock() + delay, failures)
        log.warning("no report for %s yet (%s: %s); trying again in %.0f s", key,
                    Reason.SOURCE_UNAVAILABLE, message, delay)

    def _make(self, result: PendingResult, now: datetime) -> str | None:
        """Make the next version of ``result``'s document, or mark the latest one current; returns what was made."""
        content_sha256 = result.content_sha256()
        with session_scope(self.settings) as session:
            latest = latest_version(session, result.document_key)
            if latest is not None and latest.content_sha256 == content_sha256:
                session.execute(update(ResultDocument).where(ResultDocument.id == latest.id)
                                .values(result_updated_at=result.updated_at))
                return None
            previous = from_bytes(latest.dataset) if latest is not None else None
            series_uid = latest.series_instance_uid if latest is not None else str(generate_uid())
            version = latest.version + 1 if latest is not None else 1
            predecessor_id = latest.id if latest is not None else None
            provenance = provenance_of(session, result)
        headers = [self._header(image) for image in result.images]
        sop_instance_uid = str(generate_uid())
        document = build_report(
            evidence=headers, findings=findings_of(result, headers), provenance=provenance, rule=result.rule,
            series_instance_uid=series_uid, series_number=STUDY_SERIES_NUMBER if result.kind == "study"
            else IMAGE_SERIES_NUMBER, sop_instance_uid=sop_instance_uid, instance_number=version,
            previous_version=previous)
        row = ResultDocument(
            document_key=result.document_key, version=version, predecessor_id=predecessor_id, kind=result.kind,
            study_id=result.study_id, instance_id=result.instance_id, model_version=result.model_version,
            prob_covid=result.prob_covid, label=result.label, threshold=result.threshold,
            n_images=len(result.images), content_sha256=content_sha256, result_updated_at=result.updated_at,
            sop_class_uid=str(document.SOPClassUID), sop_instance_uid=sop_instance_uid,
            series_instance_uid=series_uid, dataset=to_bytes(document), created_at=now,
        )
        try:
            with session_scope(self.settings) as session:
                session.add(row)
                session.flush()
                for destination in self.settings.dicom_destinations:
                    session.add(Delivery(document_id=row.id, destination=destination.name,
                                         state=DeliveryState.pending.value, attempts=0, next_attempt_at=now,
                                         created_at=now, updated_at=now))
        except IntegrityError:
            log.info("%s version %d was made by another process; skipping", result.document_key, version)
            return None
        log.info("made %s version %d (%s, P(covid) %.3f over %d image(s)) for %d destination(s)",
                 result.document_key, version, result.label, result.prob_covid, len(result.images),
                 len(self.settings.dicom_destinations))
        return f"{result.document_key} v{version}"

    def _header(self, image: EvaluatedImage) -> Dataset:
        if not image.stored_path:
            raise SourceUnavailable(f"instance {image.instance_id} has no archived file (after_ingest=delete?)")
        try:
            return read_source_header(image.stored_path)
        except (OSError, InvalidDicomError) as exc:
            raise SourceUnavailable(f"instance {image.instance_id}: {image.stored_path}: {exc}") from exc


class SourceUnavailable(CovidCxrError):
    """An evaluated image's archived file cannot be read, so the report cannot copy its patient and study."""

    default_reason = Reason.SOURCE_UNAVAILABLE


# --- queries ---------------------------------------------------------------------------------------


def stale_study_results(session: Session, limit: int, waiting: Collection[str] = ()) -> list[PendingResult]:
    """Up to ``limit`` study results no document reflects yet (oldest first), with the images each was taken over.

    Results whose document key is in ``waiting`` (their source files failed a moment ago) are left
    out before the limit applies, so they never crowd out the results behind them.
    """
    rows = session.execute(
        select(StudyResult, Study.study_instance_uid)
        .join(Study, Study.id == StudyResult.study_id)
        .where(~study_result_reported())
        .order_by(StudyResult.updated_at, StudyResult.id)
    ).all()
    pending: list[PendingResult] = []
    for result, study_uid in rows:
        if len(pending) == limit:
            break
        if f"study:{study_uid}" in waiting:
            continue
        counts = _RULE_COUNTS.get(result.rule, _any_view)
        images = tuple(image for image in evaluated_images(session, result.study_id, result.model_version)
                       if counts(image.view_position))
        if images:
            pending.append(PendingResult(
                kind="study", study_id=result.study_id, study_instance_uid=study_uid, instance_id=None,
                model_version=result.model_version, rule=result.rule, prob_covid=result.prob_covid,
                label=result.label, threshold=images[0].threshold, updated_at=result.updated_at, images=images))
    return pending


def stale_image_results(session: Session, limit: int, waiting: Collection[str] = ()) -> list[PendingResult]:
    """Up to ``limit`` predictions of accepted images that no per-image document reflects yet (oldest first)."""
    current = exists().where(ResultDocument.kind == "image", ResultDocument.instance_id == Prediction.instance_id,
                             ResultDocument.model_version == Prediction.model_version,
                             ResultDocument.result_updated_at >= Prediction.created_at)
    rows = session.execute(
        select(Prediction, Instance, Study.id, Study.study_instance_uid)
        .join(Instance, Instance.id == Prediction.instance_id)
        .join(Study, Study.id == Instance.study_id)
        .where(~current, Instance.state == InstanceState.predicted.value)
        .order_by(Prediction.created_at, Prediction.id)
    ).all()
    pending = [
        PendingResult(kind="image", study_id=study_id, study_instance_uid=study_uid,
                      instance_id=instance.id, model_version=prediction.model_version, rule=None,
                      prob_covid=prediction.prob_covid, label=prediction.label, threshold=prediction.threshold,
                      updated_at=prediction.created_at, images=(_evaluated(instance, prediction),))
        for prediction, instance, study_id, study_uid in rows
    ]
    return [result for result in pending if result.document_key not in waiting][:limit]


def evaluated_images(session: Session, study_id: int, model_version: str) -> list[EvaluatedImage]:
    """The study's predicted images with their prediction by ``model_version``, in the order they were recorded."""
    rows = session.execute(
        select(Instance, Prediction)
        .join(Prediction, Prediction.instance_id == Instance.id)
        .where(Instance.study_id == study_id, Instance.state == InstanceState.predicted.value,
               Prediction.model_version == model_version)
        .order_by(Instance.id)
    ).all()
    return [_evaluated(instance, prediction) for instance, prediction in rows]


def latest_version(session: Session, document_key: str) -> ResultDocument | None:
    return session.scalars(
        select(ResultDocument).where(ResultDocument.document_key == document_key)
        .order_by(ResultDocument.version.desc()).limit(1)
    ).first()


def provenance_of(session: Session, result: PendingResult) -> Provenance:
    """The model behind ``result``, from ``models`` (by the predictions' model id, else by version)."""
    model_ids = {image.model_id for image in result.images if image.model_id is not None}
    query = select(ModelVersion)
    query = (query.where(ModelVersion.id.in_(model_ids)) if model_ids
             else query.where(ModelVersion.version == result.model_version))
    record = session.scalars(query.order_by(ModelVersion.id).limit(1)).first()
    metadata = record.metadata_json if record is not None else {}
    preprocessing = session.scalar(
        select(Prediction.preprocessing_version)
        .where(Prediction.instance_id == result.images[0].instance_id,
               Prediction.model_version == result.model_version))
    return Provenance(
        model_name=record.name if record is not None else "unknown",
        model_version=result.model_version,
        model_sha256=record.sha256 if record is not None else "unknown",
        preprocessing_version=str(preprocessing or metadata.get("preprocessing_version") or "unknown"),
        threshold=result.threshold,
        software_version=__version__,
    )


def findings_of(result: PendingResult, headers: Sequence[Dataset]) -> list[Finding]:
    """The report's findings: the result itself first, then (for a study) one per referenced image."""
    key = result.document_key
    main = Finding(tracking_identifier=f"covid-cxr {result.kind} result", tracking_uid=_uid(key, "result"),
                   prob_covid=result.prob_covid, threshold=result.threshold, images=list(headers))
    if result.kind == "image":
        return [main]
    return [main] + [
        Finding(tracking_identifier=f"covid-cxr image result {image.sop_instance_uid}"[:64],
                tracking_uid=_uid(key, image.sop_instance_uid), prob_covid=image.prob_covid,
                threshold=image.threshold, images=[header])
        for image, header in zip(result.images, headers, strict=True)
    ]


def _evaluated(instance: Instance, prediction: Prediction) -> EvaluatedImage:
    return EvaluatedImage(
        instance_id=instance.id, sop_instance_uid=instance.sop_instance_uid or "",
        sop_class_uid=instance.sop_class_uid or "", view_position=(instance.view_position or "").strip().upper(),
        prob_covid=prediction.prob_covid, threshold=prediction.threshold, model_id=prediction.model_id,
        stored_path=instance.stored_path)


def _uid(*parts: str) -> str:
    """A UID derived from ``parts``: the same finding keeps its tracking UID across versions."""
    return str(generate_uid(prefix=None, entropy_srcs=list(parts)))


def _utcnow() -> datetime:
    return datetime.now(UTC)
