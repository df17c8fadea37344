"""A running batch's sign of life: its instances' ``updated_at`` is refreshed every few seconds while a worker holds it.

The ingester's reconciliation takes a ``queued`` batch that is in no queue and has been quiet for
``batch_timeout_seconds`` for lost (:mod:`taskqueue.recovery`); a batch that takes long (a model
loading, a slow CPU) stays alive through this heartbeat, one killed with its worker goes quiet.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import update

from covid_cxr.settings import Settings
from db.models import Instance, InstanceState, utcnow
from db.session import session_scope
from taskqueue.recovery import heartbeat_interval

log = logging.getLogger(__name__)

_PENDING = (InstanceState.received, InstanceState.queued)


def touch(settings: Settings, instance_ids: Sequence[int]) -> int:
    """Mark the still pending ``instance_ids`` alive now; returns how many rows were touched."""
    with session_scope(settings) as session:
        result = session.execute(
            update(Instance).where(Instance.id.in_(list(instance_ids)), Instance.state.in_(_PENDING))
            .values(updated_at=utcnow())
        )
    return int(getattr(result, "rowcount", 0) or 0)


@contextmanager
def heartbeat(settings: Settings, instance_ids: Sequence[int], interval: float | None = None) -> Iterator[None]:
    """While the block runs, :func:`touch` ``instance_ids`` every ``interval`` seconds (default from the settings).

    A heartbeat that cannot reach the database is logged and tried again at the next beat: the
    batch itself then fails or succeeds on its own.
    """
    ids = list(instance_ids)
    every = heartbeat_interval(settings) if interval is None else interval
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                touch(settings, ids)
            except Exception as exc:  # the database is away; the batch will notice on its own
                log.warning("heartbeat of %d instance(s) not written: %s: %s", len(ids), type(exc).__name__, exc)

    thread = threading.Thread(target=beat, name="batch-heartbeat", daemon=True)
    if ids:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5.0)
