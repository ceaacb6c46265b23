"""The durable job store: renders, attempts and leases, events, tenants and keys,
the cost ledger. SQLite by default, PostgreSQL by URL; every method is one short
transaction, so the gateway and the scheduler can run in different processes (or pods)
against the same database.

`JobStore` is the one class the farm uses; its parts live beside it, one job each:
`db` (engine, dialects, transactions), `notify` (announcing changes, ChangeDetector),
`rows` (a render row's moves and its record), `tenants` (tenants, keys, limits,
budgets, usage), `renders` (the gateway's side), `queue` (the scheduler's reads of the
queue), `leases` (claims, heartbeats, progress), `outcomes` (how attempts end, with the
ledger), `catalog` (pools, cost models, timing samples), `retention` (pruning what
renders that ended long ago no longer need)."""

from __future__ import annotations

import contextlib

from sqlalchemy.orm import Session

from farm.jobs import doorbell
from farm.jobs.store.catalog import CatalogStore
from farm.jobs.store.db import Database
from farm.jobs.store.leases import LeasesStore
from farm.jobs.store.notify import ChangeDetector
from farm.jobs.store.outcomes import OutcomesStore
from farm.jobs.store.queue import QueueStore
from farm.jobs.store.renders import RendersStore
from farm.jobs.store.retention import RetentionStore
from farm.jobs.store.tenants import TenantsStore

__all__ = ["JobStore"]


class JobStore(OutcomesStore, LeasesStore, RendersStore, QueueStore, TenantsStore, CatalogStore, RetentionStore):
    """The store the gateway, the scheduler and the CLI use: the parts above over one
    `Database`. OutcomesStore subclasses LeasesStore and RendersStore, so it comes first."""

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 8):
        self._db = Database(url, migrate=migrate, pool_size=pool_size)
        self.url = url
        self.is_sqlite = self._db.is_sqlite
        self.engine = self._db.engine

    def close(self) -> None:
        self._db.close()

    def ping(self) -> None:
        self._db.ping()

    def change_detector(self, on_change=None, channel: str = doorbell.QUEUE) -> ChangeDetector:
        return ChangeDetector(self.url, on_change, channel)

    def _read(self) -> contextlib.AbstractContextManager[Session]:
        # Benchmarks and cluster tests read the tables directly through this.
        return self._db.read()
