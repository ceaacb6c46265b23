"""Retention: what the store forgets of renders that ended long ago, so that it grows
with the renders it keeps a summary of, not with every progress event ever written.

A render's events (a few dozen: every stage and denoising step) are most of what it
writes; once it ended they serve only a watcher replaying it. `prune` deletes those
older than the retention of renders that ended, except the final one (the only event
in a final state), so a watch of the render still reads how it ended; and it drops the
input image (image-to-video) of renders that ended long ago, which nothing reads again.
The render's row, its attempts and its ledger entries are kept: GetRender, ListRenders,
usage reports and budgets answer as before."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable

from sqlalchemy import delete, select, update

from farm.domain.states import RenderState
from farm.jobs import schema as t
from farm.jobs.store.db import Database

# Rows per transaction: each one short, so that pruning never holds locks (or, on SQLite,
# the write lock) for long beside the farm's own writes.
EVENT_BATCH = 1000
# Images are up to megabytes each.
IMAGE_BATCH = 50
# What the scheduler prunes per autoscaling round while a prune is under way.
PRUNE_BATCHES_PER_ROUND = 4
FINAL_STATES = tuple(state.value for state in RenderState if state.is_final)
NOT_FINAL_STATES = tuple(state.value for state in RenderState if not state.is_final)


@dataclasses.dataclass(frozen=True)
class Pruned:
    events: int
    """Events deleted."""
    images: int
    """Input images dropped."""
    more: bool
    """The batches allowed ran out with more left to prune."""


class RetentionStore:
    """Pruning of what renders that ended long ago no longer need."""

    _db: Database

    def prune(self, now: dt.datetime, event_retention_days: float | None,
              image_retention_days: float | None = None, max_batches: int | None = None,
              event_batch: int = EVENT_BATCH, image_batch: int = IMAGE_BATCH) -> Pruned:
        """Deletes the events written more than `event_retention_days` before `now` of
        renders that ended, but each one's final event, and drops the input images of
        renders that ended more than `image_retention_days` ago (None keeps them), in
        transactions of at most `event_batch` events or `image_batch` images. At most
        `max_batches` transactions (None: until nothing is left)."""
        left = math.inf if max_batches is None else max_batches
        events = images = 0
        if event_retention_days is not None:
            cutoff = now - dt.timedelta(days=event_retention_days)
            events, left, finished = _repeat(lambda: self._prune_events(cutoff, event_batch), event_batch, left)
            if not finished:
                return Pruned(events, images, more=True)
        if image_retention_days is not None:
            cutoff = now - dt.timedelta(days=image_retention_days)
            images, left, finished = _repeat(lambda: self._drop_images(cutoff, image_batch), image_batch, left)
            if not finished:
                return Pruned(events, images, more=True)
        return Pruned(events, images, more=False)

    def _prune_events(self, cutoff: dt.datetime, batch: int) -> int:
        render_state = (select(t.Render.state).where(t.Render.id == t.Event.render_id)
                        .correlate(t.Event).scalar_subquery())
        with self._db.write() as session:
            ids: list[int] = []
            for state in NOT_FINAL_STATES:
                # Oldest first along ix_events_state_time, one state at a time so the index gives
                # the order, each event's render looked up by its key: the final events that stay
                # are never walked over, and the plan cannot turn into a scan of every render.
                ids += session.scalars(
                    select(t.Event.id)
                    .where(t.Event.state == state, t.Event.time < cutoff, render_state.in_(FINAL_STATES))
                    .order_by(t.Event.time).limit(batch - len(ids)))
                if len(ids) >= batch:
                    break
            if ids:
                session.execute(delete(t.Event).where(t.Event.id.in_(ids)))
        return len(ids)

    def _drop_images(self, cutoff: dt.datetime, batch: int) -> int:
        with self._db.write() as session:
            # ix_renders_image_finished holds only renders that still have an image. (Only a
            # render that ended has finished_at: a condition on its state too would tempt
            # SQLite to walk every ended render by ix_renders_lease instead.)
            ids = list(session.scalars(
                select(t.Render.id).where(t.Render.image.is_not(None), t.Render.finished_at < cutoff)
                .limit(batch)))
            if ids:
                session.execute(update(t.Render).where(t.Render.id.in_(ids)).values(image=None))
        return len(ids)


def _repeat(batch: Callable[[], int], size: int, left: float) -> tuple[int, float, bool]:
    """Runs `batch` (one transaction pruning at most `size` rows) until it prunes fewer
    or `left` batches ran out: (rows pruned, batches left, whether it finished)."""
    pruned = 0
    while left > 0:
        left -= 1
        rows = batch()
        pruned += rows
        if rows < size:
            return pruned, left, True
    return pruned, left, False
