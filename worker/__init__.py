"""Celery application and tasks: batched VGG16 inference and the nightly evaluation job.

Owns: the worker's Celery app (the shared configuration of taskqueue plus its tasks), per-process
model loading, prediction writes, the evaluation job, ``status`` and ``results``.
May import: covid_cxr, db, ingest, model_store, taskqueue. TensorFlow is imported only inside worker processes.
"""
