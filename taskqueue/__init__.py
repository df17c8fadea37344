"""The inference task queue: task names, the Celery configuration both sides share, and the producer.

Owns: the message contract (task names, JSON-only payloads of instance ids), the broker and queue
layout, publishing batches and re-sending lost ones. May import: covid_cxr, db. Never TensorFlow,
never ingest or worker: the ingester receives the publishing functions from the composition root.
"""
