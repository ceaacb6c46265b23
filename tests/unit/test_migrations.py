"""The Alembic migrations create exactly the schema the ORM describes."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from farm.jobs.migrate import current_revision, head_revision
from farm.jobs.schema import Base
from farm.jobs.store import JobStore


def test_migrations_match_the_models(store_url):
    store = JobStore(store_url)
    try:
        assert current_revision(store.engine) == head_revision()
        with store.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
        # Starting again on a migrated database is a no-op.
        JobStore(store_url).close()
    finally:
        store.close()
