"""Alembic environment: runs on the connection handed in by db.migrate, or on the configured URL."""

from alembic import context
from sqlalchemy import Connection, create_engine

from db.models import Base

target_metadata = Base.metadata
config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("alembic: no connection handed in and no sqlalchemy.url configured")
    engine = create_engine(url)
    with engine.begin() as conn:
        _migrate(conn)


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs batch mode for ALTER
        compare_type=True,
    )
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch mode rebuilds a table and renames it into place; SQLite refuses that rename while a
        # view (db/views.py) names the table, unless the legacy rename rule is on.
        connection.exec_driver_sql("PRAGMA legacy_alter_table=ON")
    with context.begin_transaction():
        context.run_migrations()
    if sqlite:
        connection.exec_driver_sql("PRAGMA legacy_alter_table=OFF")


run()
