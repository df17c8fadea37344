"""The VGG16 classifier: architecture, training, versioned artifacts, registry and metrics.

Owns: building/training/evaluating models and verifying artifacts before they are loaded.
May import: covid_cxr, ingest (its normalization function, so training equals serving), db.
"""
