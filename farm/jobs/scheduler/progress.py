"""Progress of running attempts on its way to the store: stage changes and steps are
written in batches (a short wait after the first gathers the ones that follow), and a
write brings back which of those renders were cancelled meanwhile. An attempt's ending
takes its own progress not yet written into the transaction that ends it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from farm.jobs.records import ProgressUpdate
from farm.jobs.store import JobStore

log = logging.getLogger(__name__)


class ProgressBuffer:
    def __init__(self, store: JobStore, owner: str, flush_interval_s: float, on_cancel: Callable[[str], None],
                 on_store_error: Callable[[], None] = lambda: None):
        """on_cancel(render_id): a render whose progress was written has been cancelled;
        on_store_error(): a write failed (it is retried)."""
        self.store, self.owner = store, owner
        self.on_store_error = on_store_error
        self.flush_interval_s = flush_interval_s
        self.on_cancel = on_cancel
        self._pending: list[ProgressUpdate] = []
        self._arrived = asyncio.Event()

    def add(self, update: ProgressUpdate) -> None:
        self._pending.append(update)
        self._arrived.set()

    def take(self, render_id: str) -> list[ProgressUpdate]:
        """The render's updates not yet written, no longer pending (`put_back` if their write fails)."""
        taken = [u for u in self._pending if u.render_id == render_id]
        self._pending = [u for u in self._pending if u.render_id != render_id]
        return taken

    def put_back(self, updates: list[ProgressUpdate]) -> None:
        """Updates taken whose write failed: they go first, in order."""
        self._pending = updates + self._pending

    async def flush(self) -> None:
        """Writes every pending update now."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            cancelled = await asyncio.to_thread(self.store.record_progress, self.owner, batch)
        except Exception:
            self.put_back(batch)
            self._arrived.set()
            raise
        for render_id in cancelled:
            self.on_cancel(render_id)

    async def run(self) -> None:
        """Writes updates as they arrive, in batches, until cancelled."""
        while True:
            await self._arrived.wait()
            # Waiting a moment after the first update batches the ones that follow it.
            await asyncio.sleep(self.flush_interval_s)
            self._arrived.clear()
            try:
                await self.flush()
            except Exception:
                self.on_store_error()
                log.exception("writing progress failed; will retry")
