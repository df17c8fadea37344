"""The outbox: which deliveries are due, who sends them, and what a success or failure does to their row.

A row is ``pending`` until it is ``delivered``, or ``dead`` once ``delivery_max_attempts`` attempts
failed (or its destination is no longer configured). ``next_attempt_at`` is both the due time and
the claim: a sender moves it forward by a lease before sending (compare-and-set on its old value),
so two senders never send the same row at once, and a sender that dies leaves the row due again
once the lease ran out. A failed attempt waits ``delivery_retry_seconds`` x 2^(attempts-1), at
most ``delivery_retry_max_seconds``.

A destination that stored a document and whose answer was lost (or whose row could not be
updated) gets it again on the next attempt: the same SOP Instance UID, which archives treat as
the same object. No other duplicate is possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Exists, exists, func, select, update
from sqlalchemy.orm import Session

from covid_cxr.settings import Settings
from db.models import Delivery, DeliveryState, ResultDocument, Study, StudyResult
from db.session import session_scope

#: Rows sent per destination and pass (one association carries them all).
DELIVERIES_PER_PASS = 20
#: Stored messages are cut to this length.
MAX_MESSAGE_CHARS = 2000


@dataclass(frozen=True)
class DueDelivery:
    """A claimed row: send ``document_id`` to ``destination``."""

    delivery_id: int
    document_id: int
    destination: str
    attempts: int


def claim_due(settings: Settings, now: datetime | None = None, limit: int = DELIVERIES_PER_PASS) -> list[DueDelivery]:
    """Claim up to ``limit`` due rows per destination (oldest first); each is this caller's until its lease ends."""
    now = now or _utcnow()
    lease_until = now + timedelta(seconds=lease_seconds(settings))
    claimed: list[DueDelivery] = []
    with session_scope(settings) as session:
        destinations = session.scalars(
            select(Delivery.destination).where(Delivery.state == DeliveryState.pending.value,
                                               Delivery.next_attempt_at <= now).distinct()
        ).all()
        for destination in destinations:
            rows = session.execute(
                select(Delivery.id, Delivery.document_id, Delivery.attempts, Delivery.next_attempt_at)
                .where(Delivery.state == DeliveryState.pending.value, Delivery.next_attempt_at <= now,
                       Delivery.destination == destination)
                .order_by(Delivery.document_id, Delivery.id)
                .limit(limit)
            ).all()
            for row in rows:
                taken = cast(CursorResult[Any], session.execute(
                    update(Delivery)
                    .where(Delivery.id == row.id, Delivery.state == DeliveryState.pending.value,
                           Delivery.next_attempt_at == row.next_attempt_at)
                    .values(next_attempt_at=lease_until)
                )).rowcount
                if taken == 1:
                    claimed.append(DueDelivery(row.id, row.document_id, destination, row.attempts))
    return claimed


def document_bytes(settings: Settings, document_ids: Sequence[int]) -> dict[int, bytes]:
    """The stored DICOM files of ``document_ids``."""
    with session_scope(settings) as session:
        rows = session.execute(select(ResultDocument.id, ResultDocument.dataset)
                               .where(ResultDocument.id.in_(list(document_ids)))).all()
    return {row.id: row.dataset for row in rows}


def record_delivered(settings: Settings, delivery_id: int, now: datetime | None = None) -> None:
    now = now or _utcnow()
    with session_scope(settings) as session:
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(
            state=DeliveryState.delivered.value, attempts=Delivery.attempts + 1, delivered_at=now, updated_at=now,
            reason=None, message=None))


def record_failed(settings: Settings, due: DueDelivery, reason: str, message: str, now: datetime | None = None,
                  *, final: bool = False) -> DeliveryState:
    """Count a failed attempt: the row waits its backoff, or is dead-lettered after the last attempt (or ``final``)."""
    now = now or _utcnow()
    attempts = due.attempts + 1
    dead = final or attempts >= settings.delivery_max_attempts
    state = DeliveryState.dead if dead else DeliveryState.pending
    with session_scope(settings) as session:
        session.execute(update(Delivery).where(Delivery.id == due.delivery_id).values(
            state=state.value, attempts=attempts, reason=reason, message=message[:MAX_MESSAGE_CHARS],
            next_attempt_at=now + timedelta(seconds=backoff_seconds(settings, attempts)), updated_at=now))
    return state


def retry_dead(settings: Settings, destination: str | None = None, now: datetime | None = None) -> int:
    """Put dead-lettered rows (of one destination, or all) back to ``pending`` with their attempts reset."""
    now = now or _utcnow()
    query = update(Delivery).where(Delivery.state == DeliveryState.dead.value)
    if destination:
        query = query.where(Delivery.destination == destination)
    with session_scope(settings) as session:
        result = cast(CursorResult[Any], session.execute(
            query.values(state=DeliveryState.pending.value, attempts=0, next_attempt_at=now, updated_at=now)))
    return int(result.rowcount or 0)


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """The wait after ``attempts`` failed attempts: base x 2^(attempts-1), capped."""
    return min(settings.delivery_retry_max_seconds, settings.delivery_retry_seconds * 2.0 ** max(0, attempts - 1))


def lease_seconds(settings: Settings) -> float:
    """How long a claim holds: a whole batch over one association, with room to spare."""
    return 60.0 + settings.dicom_timeout_seconds * (DELIVERIES_PER_PASS + 2)


def outbox_summary(session: Session, *, count_unreported: bool = True) -> dict[str, Any]:
    """Deliveries per state (and per destination), the latest dead letter, and results still without a report.

    ``count_unreported`` is for installations that send reports; elsewhere every study result is
    "without a report" and ``results_without_report`` is ``None``.
    """
    counts = {state.value: 0 for state in DeliveryState}
    by_destination: dict[str, dict[str, int]] = {}
    for destination, state, n in session.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)):
        counts[state] = counts.get(state, 0) + n
        by_destination.setdefault(destination, {s.value: 0 for s in DeliveryState})[state] = n
    dead = session.execute(
        select(Delivery, ResultDocument.document_key, ResultDocument.version, Study.study_instance_uid)
        .join(ResultDocument, ResultDocument.id == Delivery.document_id)
        .join(Study, Study.id == ResultDocument.study_id)
        .where(Delivery.state == DeliveryState.dead.value)
        .order_by(Delivery.updated_at.desc(), Delivery.id.desc()).limit(1)
    ).first()
    last_dead = None
    if dead is not None:
        row = dead[0]
        last_dead = {"delivery_id": row.id, "document": f"{dead.document_key} v{dead.version}",
                     "destination": row.destination, "attempts": row.attempts, "reason": row.reason,
                     "message": row.message, "at": _iso(row.updated_at)}
    return {
        "deliveries": counts,
        "by_destination": by_destination,
        "documents": session.scalar(select(func.count()).select_from(ResultDocument)) or 0,
        "results_without_report": results_without_document(session) if count_unreported else None,
        "last_dead": last_dead,
    }


def study_result_reported() -> Exists:
    """SQL: a study document reflects this ``study_results`` row (same study and model, not older)."""
    return exists().where(ResultDocument.kind == "study", ResultDocument.study_id == StudyResult.study_id,
                          ResultDocument.model_version == StudyResult.model_version,
                          ResultDocument.result_updated_at >= StudyResult.updated_at)


def results_without_document(session: Session) -> int:
    """Study results that no document reflects yet (waiting for the outbox, or for their source files)."""
    return session.scalar(select(func.count()).select_from(StudyResult).where(~study_result_reported())) or 0


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).isoformat()


def _utcnow() -> datetime:
    return datetime.now(UTC)
