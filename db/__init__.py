"""SQLAlchemy models, engine/session helpers and Alembic migrations.

Owns: the schema (studies, instances, predictions, models, labels, evaluation reports) and
its migrations. May import: covid_cxr only.
"""
