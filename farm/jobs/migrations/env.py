"""Alembic environment: farm passes the connection in; no alembic.ini is needed."""

from alembic import context

from farm.jobs.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run farm's migrations through farm.jobs.migrate.upgrade(engine)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
