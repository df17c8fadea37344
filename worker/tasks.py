"""The inference task: instance ids in; predictions, instance states and study results out, in one transaction.

One attempt = claim (count the attempt) -> load the active model -> decode the stored PNGs ->
one forward pass -> write. Permanent problems of one image fail that image at once; anything
else fails the attempt, which Celery retries with exponential backoff until
``settings.max_attempts`` is used up, and then the instances end ``failed`` with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from celery import Celery, shared_task
from celery.signals import worker_init, worker_process_init
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from covid_cxr import metrics
from covid_cxr.constants import FRONTAL_VIEWS
from covid_cxr.errors import CovidCxrError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import Instance, InstanceState, NormalizedImage, Prediction, Study, StudyResult
from db.session import dispose_engines, session_scope
from db.upsert import insert_or_ignore, insert_or_update
from taskqueue.names import PREDICT_TASK
from worker.heartbeat import heartbeat
from worker.inference import MODELS, ActiveModelCache, LoadedModel, decode_png, stack

log = logging.getLogger(__name__)

#: States from which an instance may be predicted; every other state is final for the worker.
PENDING_STATES = (InstanceState.received, InstanceState.queued)
#: Study rule names stored in ``study_results.rule``.
RULE_MAX_FRONTAL = "max_frontal"
RULE_MAX_VIEW_UNKNOWN = "max_view_unknown"
#: Longest wait between two attempts (seconds); also kept below the Redis visibility timeout.
MAX_BACKOFF_SECONDS = 60
#: Retries of a batch that could not even start (database unreachable): enough to bridge a database restart.
#: Once they are used up, the batch goes quiet and the reconciliation re-sends it (taskqueue.recovery).
START_RETRIES = 8
#: Stored messages are cut to this length.
MAX_MESSAGE_CHARS = 2000


@dataclass
class ClaimedInstance:
    """An instance this attempt will try to predict, with its stored model input."""

    instance_id: int
    attempts: int
    created_at: datetime
    study_id: int | None
    png: bytes | None
    preprocessing_version: str | None


@dataclass
class BatchReport:
    """What one attempt did; returned by the task (and logged), the database holds the details."""

    batch_id: str
    requested: int
    predicted: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    model_version: str | None = None
    forward_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class AttemptFailed(Exception):
    """An attempt failed for the whole batch; carries the claimed instances so the task can retry or fail them."""

    def __init__(self, claimed: list[ClaimedInstance], reason: Reason, message: str) -> None:
        super().__init__(f"{message} [{reason}]")
        self.claimed = claimed
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class StudyAggregate:
    n_images: int
    prob_covid: float
    rule: str


def aggregate_study(images: Iterable[tuple[str | None, float]]) -> StudyAggregate | None:
    """The study-level covid probability from its images' ``(ViewPosition, covid probability)``.

    Rule: the **maximum** covid probability over the study's frontal images (ViewPosition PA or
    AP): one suspicious frontal film is enough to flag the study. If no image has a known
    frontal view, the maximum over the images whose view is not stated (many CR exports omit
    ViewPosition) is used instead and the rule says so. Images with a known non-frontal view
    (laterals) never count; a study with only those has no study result.
    """
    frontal: list[float] = []
    unknown: list[float] = []
    for view, probability in images:
        view = (view or "").strip().upper()
        if view in FRONTAL_VIEWS:
            frontal.append(probability)
        elif not view:
            unknown.append(probability)
    if frontal:
        return StudyAggregate(len(frontal), max(frontal), RULE_MAX_FRONTAL)
    if unknown:
        return StudyAggregate(len(unknown), max(unknown), RULE_MAX_VIEW_UNKNOWN)
    return None


# --- one attempt ---------------------------------------------------------------------------------


def run_batch(settings: Settings, instance_ids: Sequence[int], batch_id: str,
              models: ActiveModelCache = MODELS) -> BatchReport:
    """One attempt at a batch. Raises :class:`AttemptFailed` when the batch as a whole failed."""
    report = BatchReport(batch_id=batch_id, requested=len(instance_ids))
    claimed, given_up = claim_instances(settings, instance_ids)
    if given_up:
        report.failed[Reason.WORKER_LOST] = len(given_up)
    report.skipped = len(instance_ids) - len(claimed) - len(given_up)
    if not claimed:
        return report
    with heartbeat(settings, [item.instance_id for item in claimed]):
        return _predict_claimed(settings, claimed, batch_id, models, report)


def _predict_claimed(settings: Settings, claimed: list[ClaimedInstance], batch_id: str, models: ActiveModelCache,
                     report: BatchReport) -> BatchReport:
    try:
        model = models.get(settings)
        report.model_version = model.version
        ready, problems = _decode(claimed, model)
        if problems:
            fail_instances(settings, problems)
            for reason, _message in problems.values():
                report.failed[reason] = report.failed.get(reason, 0) + 1
        if not ready:
            return report
        images = stack([image for _, image in ready])
        log.info("batch %s: running model %s on %d image(s)", batch_id, model.version, len(ready))
        started = time.perf_counter()
        probabilities = model.probabilities(images)
        report.forward_ms = (time.perf_counter() - started) * 1000.0
        store_predictions(settings, model, batch_id, [item for item, _ in ready], probabilities, report.forward_ms)
        metrics.batch_predicted(model.version, len(ready), report.forward_ms / 1000.0)
        report.predicted = len(ready)
    except Exception as exc:
        reason = exc.reason if isinstance(exc, CovidCxrError) else Reason.INFERENCE_ERROR
        message = exc.message if isinstance(exc, CovidCxrError) else f"{type(exc).__name__}: {exc}"
        raise AttemptFailed(claimed, reason, message[:MAX_MESSAGE_CHARS]) from exc
    return report


def claim_instances(settings: Settings, instance_ids: Sequence[int]) -> tuple[list[ClaimedInstance], list[int]]:
    """Count an attempt on the batch's pending instances and load their stored images.

    Instances in a final state are skipped (a redelivered or re-enqueued batch predicts nothing
    twice). An instance whose attempts are already used up was being processed by workers that
    never finished (killed, out of memory): it is failed with ``worker_lost`` instead of being
    tried again, so a batch that kills its worker cannot loop forever.

    Returns
    -------
    (claimed, given_up)
        The instances to predict, and the ids failed here as ``worker_lost``.
    """
    ids = sorted({int(i) for i in instance_ids})
    with session_scope(settings) as session:
        pending = session.execute(
            select(Instance.id, Instance.attempts, Instance.message)
            .where(Instance.id.in_(ids), Instance.state.in_(PENDING_STATES))
        ).all()
        exhausted = [row for row in pending if row.attempts >= settings.max_attempts]
        for row in exhausted:
            previous = f"; last error: {row.message}" if row.message else ""
            _set_failed(session, [row.id], Reason.WORKER_LOST,
                        f"gave up after {row.attempts} attempt(s) that did not finish (worker killed or out of "
                        f"memory?){previous}"[:MAX_MESSAGE_CHARS])
        live = [row.id for row in pending if row.attempts < settings.max_attempts]
        if not live:
            return [], [row.id for row in exhausted]
        session.execute(
            update(Instance)
            .where(Instance.id.in_(live), Instance.state.in_(PENDING_STATES))
            .values(attempts=Instance.attempts + 1)
        )
        rows = session.execute(
            select(Instance.id, Instance.attempts, Instance.created_at, Instance.study_id,
                   NormalizedImage.png, NormalizedImage.preprocessing_version)
            .outerjoin(NormalizedImage, NormalizedImage.instance_id == Instance.id)
            .where(Instance.id.in_(live))
            .order_by(Instance.id)
        ).all()
    claimed = [ClaimedInstance(row.id, row.attempts, row.created_at, row.study_id, row.png, row.preprocessing_version)
               for row in rows]
    return claimed, [row.id for row in exhausted]


def _decode(claimed: list[ClaimedInstance], model: LoadedModel
            ) -> tuple[list[tuple[ClaimedInstance, np.ndarray]], dict[int, tuple[Reason, str]]]:
    """Split the batch into decodable images and per-image permanent problems ``{id: (reason, message)}``."""
    ready: list[tuple[ClaimedInstance, np.ndarray]] = []
    problems: dict[int, tuple[Reason, str]] = {}
    for item in claimed:
        if item.png is None:
            problems[item.instance_id] = (Reason.MISSING_IMAGE, "no normalized image was stored for this instance")
            continue
        if model.preprocessing_version and item.preprocessing_version != model.preprocessing_version:
            problems[item.instance_id] = (
                Reason.PREPROCESSING_MISMATCH,
                f"image normalized with {item.preprocessing_version}, model {model.version} expects "
                f"{model.preprocessing_version}: ingest the file again with the matching version",
            )
            continue
        try:
            ready.append((item, decode_png(item.png)))
        except ValueError as exc:
            problems[item.instance_id] = (Reason.CORRUPT_IMAGE, str(exc))
    return ready, problems


def store_predictions(settings: Settings, model: LoadedModel, batch_id: str, items: list[ClaimedInstance],
                      probabilities: np.ndarray, forward_ms: float) -> None:
    """Write a batch's outcome in one transaction: predictions, instance states, study results.

    Predictions are inserted with ``ON CONFLICT (instance_id, model_version) DO NOTHING``: when two
    deliveries of one batch race, the first row written stays and the second is dropped.
    """
    now = _utcnow()
    positive_index = model.class_names.index(model.positive_class)
    per_image_ms = forward_ms / len(items)
    rows = []
    for item, probs in zip(items, probabilities, strict=True):
        positive = float(probs[positive_index])
        rows.append({
            "instance_id": item.instance_id,
            "model_id": model.model_id,
            "model_version": model.version,
            "preprocessing_version": item.preprocessing_version,
            "probabilities": {name: float(p) for name, p in zip(model.class_names, probs, strict=True)},
            "prob_covid": positive,
            "label": model.label_for(positive),
            "threshold": model.threshold,
            "batch_id": batch_id,
            "batch_size": len(items),
            "inference_ms": per_image_ms,
            "queued_ms": (now - _aware(item.created_at)).total_seconds() * 1000.0,
            "created_at": now,
        })
    ids = [item.instance_id for item in items]
    with session_scope(settings) as session:
        insert_or_ignore(session, Prediction, rows, key=("instance_id", "model_version"))
        session.execute(
            update(Instance)
            .where(Instance.id.in_(ids), Instance.state.in_(PENDING_STATES))
            .values(state=InstanceState.predicted, finished_at=now, reason=None, message=None,
                    batch_id=batch_id)
        )
        update_study_results(session, model, {item.study_id for item in items if item.study_id is not None})


def update_study_results(session: Session, model: LoadedModel, study_ids: set[int]) -> None:
    """Recompute the study results of ``study_ids`` for ``model`` (rule: :func:`aggregate_study`).

    The study rows are locked first (PostgreSQL; SQLite serializes writers anyway), so two
    workers finishing images of one study cannot each write an aggregate missing the other's.
    """
    if not study_ids:
        return
    ordered = sorted(study_ids)
    session.execute(select(Study.id).where(Study.id.in_(ordered)).order_by(Study.id).with_for_update())
    rows = session.execute(
        select(Instance.study_id, Instance.view_position, Prediction.prob_covid)
        .join(Prediction, Prediction.instance_id == Instance.id)
        .where(Instance.study_id.in_(ordered), Prediction.model_version == model.version,
               Instance.state == InstanceState.predicted)
    ).all()
    by_study: dict[int, list[tuple[str | None, float]]] = {}
    for row in rows:
        by_study.setdefault(row.study_id, []).append((row.view_position, row.prob_covid))
    now = _utcnow()
    for study_id in ordered:
        aggregate = aggregate_study(by_study.get(study_id, []))
        if aggregate is None:
            continue
        values = {"n_images": aggregate.n_images, "prob_covid": aggregate.prob_covid,
                  "label": model.label_for(aggregate.prob_covid), "rule": aggregate.rule, "updated_at": now}
        insert_or_update(session, StudyResult, [{"study_id": study_id, "model_version": model.version, **values}],
                         key=("study_id", "model_version"))


def fail_instances(settings: Settings, problems: dict[int, tuple[Reason, str]]) -> None:
    """End instances ``failed`` with their own ``(reason, message)``."""
    with session_scope(settings) as session:
        for instance_id, (reason, message) in problems.items():
            _set_failed(session, [instance_id], reason, message)


def record_attempt_failure(settings: Settings, failure: AttemptFailed) -> list[int]:
    """Store a failed attempt's error; instances with no attempt left end ``failed``.

    Returns the ids that may be tried again (their error is stored while they stay ``queued``).
    """
    final = [item.instance_id for item in failure.claimed if item.attempts >= settings.max_attempts]
    again = [item.instance_id for item in failure.claimed if item.attempts < settings.max_attempts]
    with session_scope(settings) as session:
        if final:
            _set_failed(session, final, failure.reason, failure.message)
        if again:
            session.execute(
                update(Instance)
                .where(Instance.id.in_(again), Instance.state.in_(PENDING_STATES))
                .values(reason=failure.reason, message=failure.message)
            )
    return again


def _set_failed(session: Session, ids: list[int], reason: Reason, message: str) -> None:
    session.execute(
        update(Instance)
        .where(Instance.id.in_(ids), Instance.state.in_(PENDING_STATES))
        .values(state=InstanceState.failed, reason=reason, message=message, finished_at=_utcnow())
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes; every timestamp this project writes is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def backoff_seconds(settings: Settings, retries: int) -> int:
    """Exponential backoff 1, 2, 4... s (Celery's own formula), capped below the broker's redelivery delay.

    Also capped at half of ``batch_timeout_seconds``: a batch waiting for its next attempt must not
    look lost to the reconciliation.
    """
    cap = max(1, min(MAX_BACKOFF_SECONDS, int(settings.requeue_after_seconds // 2),
                     int(settings.batch_timeout_seconds // 2)))
    return int(get_exponential_backoff_interval(factor=1, retries=retries, maximum=cap))


# --- the Celery task -----------------------------------------------------------------------------
# Celery ships no type information, so its decorators and signals are untyped for mypy.


@shared_task(bind=True, name=PREDICT_TASK, max_retries=None)  # type: ignore[untyped-decorator]
def predict_batch(self: Any, instance_ids: list[int], batch_id: str | None = None) -> dict[str, Any]:
    """Classify a batch of instances; see :func:`run_batch`. Retries with backoff, then fails the instances."""
    settings: Settings = self.app.covid_cxr_settings
    batch_id = batch_id or self.request.id
    countdown = backoff_seconds(settings, self.request.retries)
    try:
        report = run_batch(settings, instance_ids, batch_id)
    except AttemptFailed as failure:
        try:
            again = record_attempt_failure(settings, failure)
        except Exception as exc:
            # The database went away during the attempt: the whole batch is tried again (its attempt is counted).
            log.warning("batch %s: attempt failed (%s) and could not be recorded (%s: %s), retrying in %d s",
                        batch_id, failure, type(exc).__name__, exc, countdown)
            raise self.retry(exc=exc, countdown=countdown, max_retries=START_RETRIES) from exc
        if not again:
            log.error("batch %s: failed for good after %d attempt(s): %s", batch_id, settings.max_attempts, failure)
            return {"batch_id": batch_id, "failed": len(failure.claimed), "reason": failure.reason}
        log.warning("batch %s: attempt failed (%s), retrying %d instance(s) in %d s", batch_id, failure,
                    len(again), countdown)
        # No retry limit here: the instances' own attempts (max_attempts) end this, whatever retries came before.
        raise self.retry(kwargs={"instance_ids": again, "batch_id": batch_id}, exc=failure,
                         countdown=countdown) from failure
    except Exception as exc:
        # Nothing was claimed (database unreachable?): retry the message, long enough to bridge a
        # database restart; if that runs out the batch goes quiet and the reconciliation re-sends it.
        log.warning("batch %s: could not start (%s: %s), retrying in %d s", batch_id, type(exc).__name__, exc,
                    countdown)
        raise self.retry(exc=exc, countdown=countdown, max_retries=START_RETRIES) from exc
    log.info("batch %s: %d predicted, %d skipped, failed %s, forward %.0f ms", batch_id, report.predicted,
             report.skipped, report.failed or "none", report.forward_ms or 0.0)
    return report.to_dict()


# --- worker process set-up -----------------------------------------------------------------------

_worker_app: Celery | None = None


@worker_init.connect  # type: ignore[untyped-decorator]
def _remember_app(sender: Any = None, **_: Any) -> None:
    global _worker_app
    _worker_app = getattr(sender, "app", None)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _init_process(**_: Any) -> None:
    # Pooled database connections must not cross a fork.
    dispose_engines()
    # The registry checks the schema revision on every look-up; Alembic would log two lines each time.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    app = _worker_app
    if app is None or not getattr(app, "covid_cxr_preload_model", False):
        return
    settings: Settings = app.covid_cxr_settings
    try:
        MODELS.get(settings)
    except Exception as exc:  # a worker without a model still starts: its batches record the error
        log.warning("no model loaded at start-up (%s); batches will fail until one is active and verifiable", exc)
