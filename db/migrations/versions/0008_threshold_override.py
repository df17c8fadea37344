"""a decision threshold set at activation, overriding the model's stored one, with who set it and when

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 20:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('threshold_override', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('threshold_set_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('threshold_set_by', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('threshold_set_by')
        batch_op.drop_column('threshold_set_at')
        batch_op.drop_column('threshold_override')
