"""covid-cxr: shared plumbing (settings, errors, command line) for the ingest, worker, db and model_store packages."""

__version__ = "0.1.0"
