"""quality checks: their outcomes per instance, and the views that count them

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 20:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

from db.views import VIEWS_0002, VIEWS_0007, create_views, drop_views

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    drop_views(op.get_bind(), VIEWS_0002)
    op.create_table('quality_checks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.Integer(), nullable=False),
    sa.Column('check_name', sa.String(length=32), nullable=False),
    sa.Column('decision', sa.String(length=16), nullable=False),
    sa.Column('finding', sa.String(length=32), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('confident', sa.Boolean(), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=True),
    sa.Column('evidence', sa.Text(), nullable=True),
    sa.Column('version', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.id'], name=op.f('fk_quality_checks_instance_id_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_quality_checks')),
    sa.UniqueConstraint('instance_id', 'check_name', name='uq_quality_checks_instance_check')
    )
    with op.batch_alter_table('quality_checks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_quality_checks_decision'), ['decision'], unique=False)
        batch_op.create_index(batch_op.f('ix_quality_checks_instance_id'), ['instance_id'], unique=False)
    create_views(op.get_bind(), VIEWS_0007)


def downgrade() -> None:
    drop_views(op.get_bind(), VIEWS_0007)
    with op.batch_alter_table('quality_checks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_quality_checks_instance_id'))
        batch_op.drop_index(batch_op.f('ix_quality_checks_decision'))

    op.drop_table('quality_checks')
    create_views(op.get_bind(), VIEWS_0002)
