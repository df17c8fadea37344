"""institution, patient sex and age band (decades only) per instance, for subgroup reports

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 20:05:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('institution_name', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('patient_sex', sa.String(length=1), nullable=True))
        batch_op.add_column(sa.Column('age_band', sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('age_band')
        batch_op.drop_column('patient_sex')
        batch_op.drop_column('institution_name')
