"""ingest hardening: stuck inbox entries are listed; a rejected copy is never the primary row

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 19:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

OLD_PRIMARY = "duplicate_of_id IS NULL AND sop_instance_uid IS NOT NULL"
NEW_PRIMARY = "duplicate_of_id IS NULL AND sop_instance_uid IS NOT NULL AND state <> 'rejected'"
INDEX = "uq_instances_primary_sop_instance_uid"


def _primary_index(predicate: str) -> None:
    op.create_index(INDEX, "instances", ["sop_instance_uid"], unique=True,
                    sqlite_where=sa.text(predicate), postgresql_where=sa.text(predicate))


def upgrade() -> None:
    op.drop_index(INDEX, table_name="instances")
    _primary_index(NEW_PRIMARY)
    op.create_table(
        "stuck_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("file_name", sa.Text(), nullable=False),
        sa.Column("cause", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("ingester", sa.String(length=255), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stuck_files")),
        sa.UniqueConstraint("file_name", name=op.f("uq_stuck_files_file_name")),
    )


def downgrade() -> None:
    op.drop_table("stuck_files")
    op.drop_index(INDEX, table_name="instances")
    _primary_index(OLD_PRIMARY)
