"""WatchRender's stream of a render's events (`watch_events`), and the event hub that
wakes it: one store query per tick tells every watcher whether its render has new
events, however many watchers there are. On SQLite every commit rings a doorbell
(farm.jobs.doorbell), so the hub queries the moment events are written and otherwise
sleeps; where it cannot hear the bell it looks every few milliseconds whether anything
was committed at all (`PRAGMA data_version`, far cheaper than a query) and queries only
then. Either way a watcher hears of a final state within milliseconds without the
gateway querying the store at every look."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from farm.jobs import doorbell
from farm.jobs.records import EventRecord
from farm.jobs.store import JobStore

log = logging.getLogger(__name__)


# How often the hub checks SQLite's commit counter.
COMMIT_CHECK_INTERVAL_S = 0.005
# Where every commit rings the bell, the hub still queries this often: a ring lost costs
# at most this much. Querying at the usual interval instead woke the gateway and queried
# the store many times a second per watched farm, beside the engines it shares the cores with.
PUSHED_FALLBACK_S = 1.0
# Event sequences are an Integer column (farm.jobs.schema), 32 bits on PostgreSQL: no event
# is numbered past this, and PostgreSQL refuses to compare the column with a larger number.
LAST_STORED_SEQUENCE = 2**31 - 1


class EventHub:
    def __init__(self, store: JobStore, interval_s: float):
        self.store = store
        self.interval_s = interval_s
        self._waiters: dict[str, list[tuple[int, asyncio.Future]]] = collections.defaultdict(list)
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rung = asyncio.Event()
        # On PostgreSQL the store's detector hears only of queued renders, not of events.
        self._commits = (store.change_detector(on_change=self._on_commit, channel=doorbell.COMMITS)
                         if store.is_sqlite else None)

    def _on_commit(self) -> None:
        # Called from the doorbell's thread.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._rung.set)

    async def wait_for_events_after(self, render_id: str, seq: int) -> None:
        """Returns once the render has an event newer than `seq`."""
        self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
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
            elif self._commits.pushed:
                # Woken by a commit; the fallback covers a lost ring.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._rung.wait(), max(self.interval_s, PUSHED_FALLBACK_S))
                self._rung.clear()  # before the query, which sees every commit rung so far
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



async def watch_events(store: JobStore, hub: EventHub, tenant_id: str, render_id: str, after_sequence: int,
                       run: Callable[..., Awaitable[Any]] = asyncio.to_thread) -> AsyncIterator[EventRecord]:
    """The render's events after `after_sequence`, as they are written, until its final
    one. `run(fn, *args)` runs each store call off the event loop."""
    # Ownership check first: another tenant's render is NOT_FOUND.
    record = await run(store.get, tenant_id, render_id)
    # Events after a sequence past the last one a store holds are those after that one: none.
    seq, newest, final = min(after_sequence, LAST_STORED_SEQUENCE), record.event_seq, record.state.is_final
    while True:
        events = await run(store.events_after, render_id, seq)
        for event in events:
            yield event
            seq = newest = event.seq
            if event.state.is_final:
                return
        if events:
            continue
        # Nothing after `seq` of a final render: a client reconnecting after the final
        # event (or naming a sequence past it) has seen the end.
        if final:
            return
        # A client may name a sequence the render has not reached: wake at its next
        # event all the same, and learn from the render whether it ended.
        await hub.wait_for_events_after(render_id, min(seq, newest))
        if seq > newest:
            record = await run(store.get, tenant_id, render_id)
            newest, final = record.event_seq, record.state.is_final
