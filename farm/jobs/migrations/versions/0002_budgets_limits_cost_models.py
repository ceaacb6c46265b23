"""budgets limits absorbed charges cost models

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 09:20:55.275787
"""
import sqlalchemy as sa
from alembic import op

import farm.jobs.schema

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('cost_models',
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('device_kind', sa.String(length=32), nullable=False),
    sa.Column('coefficients_json', sa.Text(), nullable=False),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('fitted_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model', 'device_kind', name=op.f('pk_cost_models'))
    )
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        # Rows written before this migration were all charged.
        batch_op.add_column(sa.Column('charged', sa.Boolean(), nullable=False, server_default=sa.true()))

    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reserved_nanodollars', sa.BigInteger(), nullable=False, server_default='0'))

    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('budget_period', sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column('budget_nanodollars', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('max_running', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_queued', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('max_queued')
        batch_op.drop_column('max_running')
        batch_op.drop_column('budget_nanodollars')
        batch_op.drop_column('budget_period')

    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.drop_column('reserved_nanodollars')

    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.drop_column('charged')

    op.drop_table('cost_models')
