"""result documents and deliveries (DICOM results outbox)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 19:07:06.272061
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'result_documents',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('document_key', sa.String(length=80), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('predecessor_id', sa.Integer(), nullable=True),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('study_id', sa.Integer(), nullable=False),
        sa.Column('instance_id', sa.Integer(), nullable=True),
        sa.Column('model_version', sa.String(length=64), nullable=False),
        sa.Column('prob_covid', sa.Float(), nullable=False),
        sa.Column('label', sa.String(length=16), nullable=False),
        sa.Column('threshold', sa.Float(), nullable=False),
        sa.Column('n_images', sa.Integer(), nullable=False),
        sa.Column('content_sha256', sa.String(length=64), nullable=False),
        sa.Column('result_updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('dataset', sa.LargeBinary(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['instance_id'], ['instances.id'],
                                name=op.f('fk_result_documents_instance_id_instances')),
        sa.ForeignKeyConstraint(['predecessor_id'], ['result_documents.id'],
                                name=op.f('fk_result_documents_predecessor_id_result_documents')),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_result_documents_study_id_studies')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_result_documents')),
        sa.UniqueConstraint('document_key', 'version', name='uq_result_documents_key_version'),
        sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_result_documents_sop_instance_uid')),
    )
    with op.batch_alter_table('result_documents', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_documents_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_result_documents_study_id'), ['study_id'], unique=False)

    op.create_table(
        'deliveries',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('document_id', sa.Integer(), nullable=False),
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('reason', sa.String(length=64), nullable=True),
        sa.Column('message', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['document_id'], ['result_documents.id'],
                                name=op.f('fk_deliveries_document_id_result_documents')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_deliveries')),
        sa.UniqueConstraint('document_id', 'destination', name='uq_deliveries_document_destination'),
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_document_id'), ['document_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_next_attempt_at'), ['next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_state'), ['state'], unique=False)


def downgrade() -> None:
    op.drop_table('deliveries')
    op.drop_table('result_documents')
