"""Sending chosen instances through the inference queue again, once an operator fixed what made them fail.

A ``failed`` instance gets a fresh start (``received``, no attempts, no error) and is sent; a
``queued`` or ``received`` one is just sent again (it has attempts left, and the worker skips what
was predicted meanwhile). Sending goes through the producer, so a broker that is down leaves the
rest ``received`` for the reconciliation loop.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update

from covid_cxr.settings import Settings
from db.models import Instance, InstanceState
from db.session import session_scope
from taskqueue.producer import send_in_batches

log = logging.getLogger(__name__)

#: States ``requeue`` may select: the final ``failed``, and the two waiting states.
REQUEUE_STATES = (InstanceState.failed, InstanceState.queued, InstanceState.received)


@dataclass
class RequeuePlan:
    """What ``requeue`` selected: ids, and how many per reason code (``None`` for no reason)."""

    state: str
    ids: list[int] = field(default_factory=list)
    reasons: Counter[str | None] = field(default_factory=Counter)


@dataclass
class RequeueResult:
    plan: RequeuePlan
    reset: int = 0
    sent: int = 0


def select_instances(settings: Settings, *, state: str = InstanceState.failed, reason: str | None = None,
                     since: datetime | None = None) -> RequeuePlan:
    """Instances in ``state`` (one of :data:`REQUEUE_STATES`), of ``reason`` if given, changed at or after ``since``."""
    if state not in REQUEUE_STATES:
        raise ValueError(f"cannot requeue state {state!r}: choose one of {', '.join(REQUEUE_STATES)}")
    query = select(Instance.id, Instance.reason).where(Instance.state == state)
    if reason is not None:
        query = query.where(Instance.reason == reason)
    if since is not None:
        query = query.where(Instance.updated_at >= since)
    plan = RequeuePlan(state)
    with session_scope(settings) as session:
        for row in session.execute(query.order_by(Instance.id)):
            plan.ids.append(row.id)
            plan.reasons[row.reason] += 1
    return plan


def requeue(settings: Settings, plan: RequeuePlan) -> RequeueResult:
    """Carry out ``plan``: reset failed instances to a fresh start, then send every selected one."""
    result = RequeueResult(plan)
    if not plan.ids:
        return result
    ids = plan.ids
    if plan.state == InstanceState.failed:
        with session_scope(settings) as session:
            # Only rows still failed: one a worker or another operator changed meanwhile is left alone.
            ids = list(session.scalars(
                update(Instance)
                .where(Instance.id.in_(plan.ids), Instance.state == InstanceState.failed)
                .values(state=InstanceState.received, attempts=0, reason=None, message=None,
                        finished_at=None)
                .returning(Instance.id)
            ))
        result.reset = len(ids)
    result.sent = send_in_batches(settings, sorted(ids))
    log.info("requeue: %d %s instance(s) selected, %d reset, %d sent", len(plan.ids), plan.state, result.reset,
             result.sent)
    return result
