"""Celery application and tasks: batched VGG16 inference and the nightly evaluation job.

Owns: the Celery app, queues and routing, per-process model loading, prediction writes.
May import: covid_cxr, db, model_store. TensorFlow is imported only inside worker processes.
"""
