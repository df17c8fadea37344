"""The installation's gauges, read from the database, the broker and the data dir's disk each time they are scraped.

Every ``/metrics`` endpoint serves them beside its own process's counters (:mod:`covid_cxr.metrics`):
any one scrape target shows the whole installation. They are the same on every endpoint of one
installation, so aggregate them with ``max`` across targets, never ``sum``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from covid_cxr.metrics import label_value
from covid_cxr.settings import Settings

log = logging.getLogger(__name__)


class InstallationCollector(Collector):
    """Gauges of the installation: files by state and reason, queue depth, waiting work, reports, disk, model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        yield from self._disk()
        database_up = GaugeMetricFamily("covid_cxr_database_up", "1 when the database answered this scrape")
        try:
            families = list(self._from_database())
        except Exception as exc:  # the scrape still says that the database is down
            log.warning("metrics: database unreachable: %s: %s", type(exc).__name__, exc)
            families = []
        database_up.add_metric([], 1.0 if families else 0.0)
        yield database_up
        yield from families
        yield from self._queues()

    def _from_database(self) -> Iterator[Metric]:
        from db.session import session_scope
        from taskqueue.recovery import overdue_summary
        from web.queries import counts_by_state_and_reason, latest_report_ages, stuck_entry_count
        from worker.results import active_model, oldest_pending

        now = datetime.now(UTC)
        with session_scope(self.settings) as session:
            counts = counts_by_state_and_reason(session)
            stuck = stuck_entry_count(session)
            pending = oldest_pending(session)
            ages = latest_report_ages(session, now)
            model = active_model(session, self.settings.model_name)
        files = GaugeMetricFamily("covid_cxr_files", "Files recorded in the database, by state and reason code",
                                  labels=["state", "reason"])
        for state, reason, count in counts:
            files.add_metric([state, label_value(reason)], count)
        yield files
        overdue_files = GaugeMetricFamily(
            "covid_cxr_overdue_files", "Files waiting for a prediction with no sign of life for batch_timeout_seconds")
        overdue_files.add_metric([], overdue_summary(self.settings, now)["instances"])
        yield overdue_files
        stuck_files = GaugeMetricFamily(
            "covid_cxr_stuck_files", "Inbox entries the ingester cannot take (links, unreadable, too long...)")
        stuck_files.add_metric([], stuck)
        yield stuck_files
        oldest = GaugeMetricFamily("covid_cxr_oldest_pending_age_seconds",
                                   "Age of the oldest file waiting for a prediction (0 when none waits)")
        oldest.add_metric([], pending["age_seconds"] if pending else 0.0)
        yield oldest
        report_age = GaugeMetricFamily("covid_cxr_evaluation_report_age_seconds",
                                       "Seconds since the newest evaluation report of each model version, level and "
                                       "window was stored", labels=["model_version", "level", "window"])
        for version, level, window, seconds in ages:
            report_age.add_metric([label_value(version), level, window], seconds)
        yield report_age
        active = GaugeMetricFamily("covid_cxr_active_model_info", "The model version the workers serve (value 1)",
                                   labels=["model_name", "model_version"])
        if model is not None:
            active.add_metric([label_value(model["name"]), label_value(model["version"])], 1.0)
        yield active

    def _queues(self) -> Iterator[Metric]:
        from worker.results import queue_depths

        depths, error = queue_depths(self.settings)
        broker_up = GaugeMetricFamily("covid_cxr_broker_up", "1 when the broker answered this scrape")
        broker_up.add_metric([], 0.0 if error else 1.0)
        yield broker_up
        depth = GaugeMetricFamily("covid_cxr_queue_depth_messages", "Messages waiting in each queue (a batch a "
                                  "worker has taken is not counted)", labels=["queue"])
        for queue, messages in depths.items():
            depth.add_metric([queue], messages)
        yield depth

    def _disk(self) -> Iterator[Metric]:
        from web.queries import disk_space

        space = disk_space(self.settings.data_dir)
        free = GaugeMetricFamily("covid_cxr_disk_free_bytes", "Free bytes on the data dir's file system",
                                 labels=["path"])
        total = GaugeMetricFamily("covid_cxr_disk_size_bytes", "Size of the data dir's file system",
                                  labels=["path"])
        if space is not None:
            free.add_metric([space.path], space.free_bytes)
            total.add_metric([space.path], space.total_bytes)
        yield free
        yield total
