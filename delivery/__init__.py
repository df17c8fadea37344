"""Results as DICOM and their delivery: Structured Reports made from study (and image) results, sent from an outbox.

Owns: the SR content and object (:mod:`delivery.content`, :mod:`delivery.sr`), the documents made
from the database's results (:mod:`delivery.documents`), the outbox rows and their retry policy
(:mod:`delivery.outbox`), the senders (:mod:`delivery.senders`) and the loop that runs them
(:mod:`delivery.runner`).
May import: covid_cxr, db and model_store; never the queue or the worker (the worker's status
command reads the outbox through :func:`delivery.outbox.outbox_summary`).
"""
