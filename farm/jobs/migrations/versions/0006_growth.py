"""a render's work key and indexes of queued renders only, so that autoscaling and claims
cost the same with a long queue; indexes for pruning old events and images

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 12:00:00
"""
import sqlalchemy as sa
from alembic import op

from farm.jobs.schema import work_key

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

QUEUED_ONLY = sa.text("state = 'QUEUED'")
HAS_IMAGE = sa.text("image IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.add_column(sa.Column('work_key', sa.String(length=16), nullable=True))
    # Renders that may still be queued get their key; those that ended never need one.
    renders = sa.table('renders', sa.column('id', sa.String), sa.column('state', sa.String),
                       sa.column('spec_json', sa.Text), sa.column('work_key', sa.String))
    bind = op.get_bind()
    rows = bind.execute(sa.select(renders.c.id, renders.c.spec_json)
                        .where(renders.c.state.in_(('QUEUED', 'RUNNING')))).all()
    if rows:
        bind.execute(sa.update(renders).where(renders.c.id == sa.bindparam('row_id'))
                     .values(work_key=sa.bindparam('key')),
                     [{'row_id': row.id, 'key': work_key(row.spec_json)} for row in rows])
    op.create_index('ix_renders_queued_heads', 'renders',
                    ['model', 'tenant_id', sa.text('priority DESC'), 'created_at', 'id'],
                    postgresql_where=QUEUED_ONLY, sqlite_where=QUEUED_ONLY)
    op.create_index('ix_renders_queued_work', 'renders',
                    ['model', 'work_key', 'require_device_kind', 'checkpoint_step', 'id'],
                    postgresql_where=QUEUED_ONLY, sqlite_where=QUEUED_ONLY)
    op.create_index('ix_renders_image_finished', 'renders', ['finished_at'],
                    postgresql_where=HAS_IMAGE, sqlite_where=HAS_IMAGE)
    # It reads every event: on a large store an operator may build it first with CREATE INDEX
    # CONCURRENTLY ix_events_state_time ON events (state, time), which holds no write back.
    op.create_index('ix_events_state_time', 'events', ['state', 'time'], if_not_exists=True)


def downgrade() -> None:
    op.drop_index('ix_events_state_time', table_name='events')
    op.drop_index('ix_renders_image_finished', table_name='renders')
    op.drop_index('ix_renders_queued_work', table_name='renders')
    op.drop_index('ix_renders_queued_heads', table_name='renders')
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.drop_column('work_key')
