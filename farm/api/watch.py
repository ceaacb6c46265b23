"""The event hub behind WatchRender: one store query per tick tells every watcher
whether its render has new events, however many watchers there are. On SQLite the
hub looks every few milliseconds whether anything was committed at all (`PRAGMA
data_version`, microseconds) and queries only then, so a watcher hears of a final
state within milliseconds without the gateway querying the store 200 times a second."""

from __future__ import annotations

import asyncio
import collections
import logging

from farm.jobs.store import JobStore

log = logging.getLogger(__name__)


# How often the hub checks SQLite's commit counter.
COMMIT_CHECK_INTERVAL_S = 0.005


class EventHub:
    def __init__(self, store: JobStore, interval_s: float):
        self.store = store
        self.interval_s = interval_s
        # On PostgreSQL the store's detector hears only of queued renders, not of events.
        self._commits = store.change_detector() if store.is_sqlite else None
        self._waiters: dict[str, list[tuple[int, asyncio.Future]]] = collections.defaultdict(list)
        self._task: asyncio.Task | None = None

    async def wait_for_events_after(self, render_id: str, seq: int) -> None:
        """Returns once the render has an event newer than `seq`."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[render_id].append((seq, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll())
        try:
            await future
        finally:
            waiters = self._waiters.get(render_id)
            if waiters is not None:
                waiters[:] = [w for w in waiters if w[1] is not future]
                if not waiters:
                    del self._waiters[render_id]

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        last_query = 0.0
        while self._waiters:
            if self._commits is None:
                await asyncio.sleep(self.interval_s)
            else:
                await asyncio.sleep(COMMIT_CHECK_INTERVAL_S)
                # Query when something was committed, and at the usual interval regardless.
                if not self._commits.changed() and loop.time() - last_query < self.interval_s:
                    continue
            last_query = loop.time()
            try:
                positions = await asyncio.to_thread(self.store.event_positions, list(self._waiters))
            except Exception:
                log.exception("polling event positions failed")
                continue
            for render_id, newest in positions.items():
                for seq, future in self._waiters.get(render_id, ()):
                    if newest > seq and not future.done():
                        future.set_result(None)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._commits is not None:
            self._commits.close()

