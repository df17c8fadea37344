"""The outbox loop: every ``delivery_poll_seconds``, make the missing reports, then send what is due.

It runs as a thread of the process that owns the archive (``serve``, ``ingest``) or alone
(``covid-cxr deliver``), never in a Celery worker: the reports copy patient and study attributes
from the archived source files, which only the ingesting machine is sure to see, and a
destination that is down (connect timeouts) must not hold up inference. Several loops may run
against one database: claims and unique versions keep them from doing anything twice.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from covid_cxr.errors import ConfigurationError
from covid_cxr.reasons import Reason
from covid_cxr.settings import Settings
from db.models import DeliveryState
from delivery.documents import DocumentMaker
from delivery.outbox import DueDelivery, claim_due, document_bytes, record_delivered, record_failed
from delivery.senders import Outcome, send
from delivery.sr import from_bytes

log = logging.getLogger(__name__)


@dataclass
class PassReport:
    """What one pass did."""

    made: list[str] = field(default_factory=list)
    delivered: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    dead: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.made or self.delivered or self.failed)


def check_delivery_settings(settings: Settings) -> None:
    """Refuse a configuration that cannot make reports: they need the archived (or kept) source files."""
    if settings.dicom_destinations and settings.after_ingest == "delete":
        raise ConfigurationError(
            "results are sent as DICOM reports (COVID_CXR_DICOM_DESTINATIONS), which copy patient and study "
            "attributes from the source files; COVID_CXR_AFTER_INGEST=delete leaves none: use archive or keep")


class OutboxRunner:
    """Makes reports and delivers them, one :meth:`run_once` pass at a time or in a loop until :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        check_delivery_settings(settings)
        self.settings = settings
        self.maker = DocumentMaker(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, now: datetime | None = None) -> PassReport:
        """Make the missing reports, then send every due delivery once."""
        now = now or datetime.now(UTC)
        report = PassReport()
        made = self.maker.run_once(now)
        report.made = made.made
        destinations = {destination.name: destination for destination in self.settings.dicom_destinations}
        due_by_destination: dict[str, list[DueDelivery]] = defaultdict(list)
        for due in claim_due(self.settings, now):
            due_by_destination[due.destination].append(due)
        for name, dues in due_by_destination.items():
            destination = destinations.get(name)
            if destination is None:
                for due in dues:
                    record_failed(self.settings, due, Reason.UNKNOWN_DESTINATION,
                                  f"destination {name!r} is not in COVID_CXR_DICOM_DESTINATIONS", now, final=True)
                report.dead += len(dues)
                continue
            datasets = document_bytes(self.settings, [due.document_id for due in dues])
            outcomes = send(self.settings, destination,
                            [(due.delivery_id, from_bytes(datasets[due.document_id])) for due in dues])
            for due in dues:
                self._record(due, outcomes[due.delivery_id], destination.describe(), report, now)
        return report

    def _record(self, due: DueDelivery, outcome: Outcome, where: str, report: PassReport, now: datetime) -> None:
        if outcome.delivered:
            record_delivered(self.settings, due.delivery_id, now)
            report.delivered += 1
            log.info("delivered document %d to %s", due.document_id, where)
            return
        reason = (outcome.reason or Reason.STORE_FAILED).value
        state = record_failed(self.settings, due, reason, outcome.message or reason, now)
        report.failed[reason] = report.failed.get(reason, 0) + 1
        if state is DeliveryState.dead:
            report.dead += 1
            log.error("document %d dead-lettered for %s after %d attempt(s): %s: %s", due.document_id, where,
                      due.attempts + 1, reason, outcome.message)
        else:
            log.warning("document %d not delivered to %s (attempt %d of %d): %s: %s", due.document_id, where,
                        due.attempts + 1, self.settings.delivery_max_attempts, reason, outcome.message)

    # --- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        """Pass after pass until :meth:`stop`; an error in a pass (database down) is logged and the loop goes on."""
        log.info("outbox: sending results to %s (every %.1f s, %d attempts at most)",
                 ", ".join(d.describe() for d in self.settings.dicom_destinations),
                 self.settings.delivery_poll_seconds, self.settings.delivery_max_attempts)
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("outbox pass failed; trying again in %.1f s", self.settings.delivery_poll_seconds)
            self._stop.wait(self.settings.delivery_poll_seconds)

    def start(self) -> OutboxRunner:
        """Run the loop in a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="outbox", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the pass at hand and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
