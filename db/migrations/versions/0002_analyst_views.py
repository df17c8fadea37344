"""analyst views

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 19:20:00.000000
"""

from alembic import op

from db.views import VIEWS_0002, create_views, drop_views

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_views(op.get_bind(), VIEWS_0002)


def downgrade() -> None:
    drop_views(op.get_bind(), VIEWS_0002)
