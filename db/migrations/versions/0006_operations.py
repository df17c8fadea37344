"""operations: purge marks, nullable normalized images, ingest status

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

from db.views import VIEWS_0002, create_views, drop_views

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    bind = op.get_bind()
    # SQLite rebuilds the table to drop NOT NULL; its views would name a table that is briefly gone.
    rebuilds = bind.dialect.name == "sqlite"
    if rebuilds:
        drop_views(bind, VIEWS_0002)
    with op.batch_alter_table("normalized_images") as batch:
        batch.alter_column("png", existing_type=sa.LargeBinary(), nullable=True)
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    if rebuilds:
        create_views(bind, VIEWS_0002)
    op.create_table(
        "ingest_status",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("paused_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("disk_path", sa.Text(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ingest_status")),
    )


def downgrade() -> None:
    op.drop_table("ingest_status")
    bind = op.get_bind()
    rebuilds = bind.dialect.name == "sqlite"
    if rebuilds:
        drop_views(bind, VIEWS_0002)
    with op.batch_alter_table("normalized_images") as batch:
        batch.drop_column("purged_at")
        batch.alter_column("png", existing_type=sa.LargeBinary(), nullable=False)
    if rebuilds:
        create_views(bind, VIEWS_0002)
    op.drop_column("instances", "purged_at")
