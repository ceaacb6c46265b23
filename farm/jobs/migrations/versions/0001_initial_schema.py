"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-21 08:18:11.347486
"""
import sqlalchemy as sa
from alembic import op

import farm.jobs.schema

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('pools',
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('replicas', sa.Integer(), nullable=False),
    sa.Column('device_kind', sa.String(length=32), nullable=False),
    sa.Column('scheduler', sa.String(length=64), nullable=False),
    sa.Column('updated_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model', name=op.f('pk_pools'))
    )
    op.create_table('tenants',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('created_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('name', name=op.f('uq_tenants_name'))
    )
    op.create_table('api_keys',
    sa.Column('key_id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('key_id', name=op.f('pk_api_keys'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('renders',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('idempotency_key', sa.String(length=128), nullable=True),
    sa.Column('request_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('task', sa.String(length=32), nullable=False),
    sa.Column('spec_json', sa.Text(), nullable=False),
    sa.Column('image', sa.LargeBinary(), nullable=True),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('total_steps', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.Column('started_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=True),
    sa.Column('artifact_uri', sa.Text(), nullable=True),
    sa.Column('manifest_uri', sa.Text(), nullable=True),
    sa.Column('cost_nanodollars', sa.BigInteger(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('event_seq', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_renders_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_renders')),
    sa.UniqueConstraint('tenant_id', 'idempotency_key', name=op.f('uq_renders_tenant_id_idempotency_key'))
    )
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.create_index('ix_renders_claim', ['state', 'model', 'priority', 'created_at'], unique=False)
        batch_op.create_index('ix_renders_lease', ['state', 'lease_expires_at'], unique=False)
        batch_op.create_index('ix_renders_tenant_created', ['tenant_id', 'created_at'], unique=False)

    op.create_table('attempts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('render_id', sa.String(length=32), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=64), nullable=False),
    sa.Column('started_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.Column('ended_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=True),
    sa.Column('device_kind', sa.String(length=32), nullable=True),
    sa.Column('node', sa.String(length=128), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('timings_json', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['render_id'], ['renders.id'], name=op.f('fk_attempts_render_id_renders')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_attempts')),
    sa.UniqueConstraint('render_id', 'number', name=op.f('uq_attempts_render_id_number'))
    )
    op.create_table('events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('render_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('time', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('total_steps', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['render_id'], ['renders.id'], name=op.f('fk_events_render_id_renders')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events')),
    sa.UniqueConstraint('render_id', 'seq', name=op.f('uq_events_render_id_seq'))
    )
    op.create_table('ledger',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('render_id', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.String(length=32), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('phase', sa.String(length=32), nullable=False),
    sa.Column('device_kind', sa.String(length=32), nullable=False),
    sa.Column('device_seconds', sa.Float(), nullable=False),
    sa.Column('nanodollars', sa.BigInteger(), nullable=False),
    sa.Column('created_at', farm.jobs.schema.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['render_id'], ['renders.id'], name=op.f('fk_ledger_render_id_renders')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_ledger_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger')),
    sa.UniqueConstraint('render_id', 'attempt', 'phase', 'device_kind', name=op.f('uq_ledger_render_id_attempt_phase_device_kind'))
    )
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.create_index('ix_ledger_tenant_created', ['tenant_id', 'created_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.drop_index('ix_ledger_tenant_created')

    op.drop_table('ledger')
    op.drop_table('events')
    op.drop_table('attempts')
    with op.batch_alter_table('renders', schema=None) as batch_op:
        batch_op.drop_index('ix_renders_tenant_created')
        batch_op.drop_index('ix_renders_lease')
        batch_op.drop_index('ix_renders_claim')

    op.drop_table('renders')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_tenant_id'))

    op.drop_table('api_keys')
    op.drop_table('tenants')
    op.drop_table('pools')
