"""pools per device kind, placement, post-processing results, preemption checkpoints

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 12:00:00
"""
import sqlalchemy as sa
from alembic import op

import farm.jobs.schema

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('require_device_kind', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('prefer_device_kind', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('device_kind', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('quality_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('candidates_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('preemptions', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('checkpoint_uri', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('checkpoint_step', sa.Integer(), nullable=False, server_default='0'))

    # Pool rows are a live status report (rewritten every heartbeat), so the table is
    # recreated with its new key rather than migrated.
    op.drop_table('pools')
    op.create_table('pools',
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('device_kind', sa.String(length=32), nullable=False),
    sa.Column('replicas', sa.Integer(), nullable=False),
    sa.Column('min_replicas', sa.Integer(), nullable=False),
    sa.Column('max_replicas', sa.Integer(), nullable=False),
    sa.Column('scheduler', sa.String(length=64), nullable=False),
    sa.Column('updated_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model', 'device_kind', name=op.f('pk_pools'))
    )


def downgrade() -> None:
    op.drop_table('pools')
    op.create_table('pools',
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('replicas', sa.Integer(), nullable=False),
    sa.Column('device_kind', sa.String(length=32), nullable=False),
    sa.Column('scheduler', sa.String(length=64), nullable=False),
    sa.Column('updated_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model', name=op.f('pk_pools'))
    )
    with op.batch_alter_table('renders', schema=None) as batch_op:
        for column in ('checkpoint_step', 'checkpoint_uri', 'preemptions', 'candidates_json', 'quality_json',
                       'device_kind', 'prefer_device_kind', 'require_device_kind'):
            batch_op.drop_column(column)
