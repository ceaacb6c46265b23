"""the W3C trace context of a render's submit, so that every process that works on the
render continues its trace

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 23:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trace_parent', sa.String(length=55), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.drop_column('trace_parent')
