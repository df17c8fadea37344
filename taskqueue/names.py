"""Task names: the contract between the producers (ingester, scheduler, CLI) and the worker's tasks."""

from __future__ import annotations

#: Task that classifies one batch of instances (routed to ``settings.inference_queue``).
PREDICT_TASK = "covid_cxr.predict_batch"
#: Task that evaluates recent predictions against ground truth (routed to ``settings.cpu_queue``).
EVALUATE_TASK = "covid_cxr.evaluate"
