"""The composition root: the ``covid-cxr`` command line and the long-running commands that wire the packages.

Owns: ``serve`` (watcher, worker and scheduler in one command), ``ingest`` (the watcher alone) and
``worker`` (a Celery worker), their start-up checks and signal handling. It is the one place that
may import every package; nothing imports it (``python -m covid_cxr`` is its entry point).
"""
