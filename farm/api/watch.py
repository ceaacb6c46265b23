"""The event hub behind WatchRender: one store query per tick tells every watcher
whether its render has new events, however many watchers there are."""

from __future__ import annotations

import asyncio
import collections
import logging

from farm.jobs.store import JobStore

log = logging.getLogger(__name__)


class EventHub:
    def __init__(self, store: JobStore, interval_s: float):
        self.store = store
        self.interval_s = interval_s
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
        while self._waiters:
            await asyncio.sleep(self.interval_s)
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
