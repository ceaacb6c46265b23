"""The scheduler's loop: claim queued renders for free engine slots (priority, then
age), stream each to its engine pool, write progress in batches, keep leases alive,
cancel on request, requeue what was lost, and finish each attempt with its charges.

It knows engines only through `EnginePool`, so it runs (and is tested) without Ray;
`farm.serve` wraps Ray Serve deployment handles into pools."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from farm.config import FarmConfig
from farm.engines.base import EngineRequest, PhaseTiming
from farm.errors import EngineLost
from farm.jobs.records import ClaimedRender, ProgressUpdate
from farm.jobs.schema import utcnow
from farm.jobs.states import AttemptOutcome, Stage
from farm.jobs.store import JobStore
from farm.metering.cost import price_timings

log = logging.getLogger(__name__)


class RenderStream(Protocol):
    """Events of one attempt from an engine, in lists of dicts (see `farm.serve.engine`)."""

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...

    def cancel(self) -> None: ...


class EnginePool(Protocol):
    model: str
    device_kind: str

    @property
    def slots(self) -> int:
        """Renders the pool can take at once."""

    def render(self, request: EngineRequest) -> RenderStream: ...


class SchedulerMetrics(Protocol):
    def attempt_started(self, claimed: ClaimedRender, queue_wait_s: float | None) -> None: ...

    def step_finished(self, model: str, device_kind: str, seconds: float) -> None: ...

    def render_finished(self, tenant: str, model: str, state: str, duration_s: float | None, frames: int,
                        charges: list) -> None: ...

    def attempt_absorbed(self, model: str, charges: list) -> None: ...

    def budget_left(self, tenant: str, dollars: float) -> None: ...

    def running(self, model: str, count: int) -> None: ...


@dataclasses.dataclass
class _Running:
    claimed: ClaimedRender
    stream: RenderStream | None = None
    task: asyncio.Task | None = None
    cancel_sent: bool = False
    engine_started: bool = False
    # Phases finished so far, for charging work done before a cancel.
    timings: list[PhaseTiming] = dataclasses.field(default_factory=list)


def engine_request(claimed: ClaimedRender) -> EngineRequest:
    spec = claimed.spec
    return EngineRequest(
        render_id=claimed.id, attempt=claimed.attempt, task=spec.task, prompt=spec.prompt,
        negative_prompt=spec.negative_prompt, image=spec.image or None, width=spec.width, height=spec.height,
        num_frames=spec.num_frames, fps=spec.fps, num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale, seed=spec.seed,
        postprocess=spec.postprocess,
    )


class Scheduler:
    def __init__(self, store: JobStore, pools: dict[str, EnginePool], config: FarmConfig, owner: str,
                 metrics: SchedulerMetrics):
        self.store = store
        self.pools = pools
        self.config = config
        self.settings = config.scheduler
        self.owner = owner
        self.metrics = metrics
        self.running: dict[str, _Running] = {}
        self._pending: list[ProgressUpdate] = []
        self._progress_arrived = asyncio.Event()
        self._wake = asyncio.Event()
        self._changes = store.change_detector()
        self._maybe_more = True
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        loops = (self._claim_loop, self._flush_loop, self._lease_loop, self._cancel_loop)
        self._tasks = [asyncio.create_task(loop(), name=loop.__name__) for loop in loops]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush()
        self._changes.close()

    def wake(self) -> None:
        self._maybe_more = True
        self._wake.set()

    def running_count(self, model: str) -> int:
        return sum(1 for r in self.running.values() if r.claimed.spec.model == model)

    # -- loops -----------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            try:
                claimed = await self._claim_once()
            except Exception:
                log.exception("claiming renders failed; retrying")
                claimed = 0
            if not claimed:
                self._wake.clear()
                # With every slot busy only a finishing render can make room: no polling.
                timeout = self.settings.poll_interval_s if self._free_slots() else None
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass

    def _free_slots(self) -> dict[str, int]:
        depth = 1 + self.settings.prefetch_per_replica
        free = {model: pool.slots * depth - self.running_count(model) for model, pool in self.pools.items()}
        return {model: slots for model, slots in free.items() if slots > 0}

    async def _claim_once(self) -> int:
        free = self._free_slots()
        if not free:
            return 0
        # Cheap checks first: an idle farm must not spend a core polling the store.
        if not (self._changes.changed() or self._maybe_more):
            return 0
        self._maybe_more = False
        if not await asyncio.to_thread(self.store.has_queued, list(free)):
            return 0
        claimed = await asyncio.to_thread(self.store.claim, free, self.owner, self.settings.lease_seconds)
        # Slots filled up: more may be queued than was claimed; look again when one frees.
        self._maybe_more = len(claimed) >= sum(free.values())
        for render in claimed:
            entry = _Running(render)
            self.running[render.id] = entry
            entry.task = asyncio.create_task(self._run_attempt(entry), name=f"render-{render.id}")
        self._publish_running()
        return len(claimed)

    async def _flush_loop(self) -> None:
        while True:
            await self._progress_arrived.wait()
            # Waiting a moment after the first event batches the ones that follow it.
            await asyncio.sleep(self.settings.event_flush_interval_s)
            self._progress_arrived.clear()
            try:
                await self._flush()
            except Exception:
                log.exception("writing progress failed; will retry")

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            cancelled = await asyncio.to_thread(self.store.record_progress, self.owner, batch)
        except Exception:
            self._pending = batch + self._pending
            self._progress_arrived.set()
            raise
        for render_id in cancelled:
            self._cancel(render_id)

    async def _lease_loop(self) -> None:
        while True:
            try:
                await self._renew_leases()
                requeued = await asyncio.to_thread(self.store.requeue_expired, self.settings.max_attempts)
                if requeued:
                    log.warning("requeued renders whose lease expired: %s", requeued)
                    self.wake()
                pools = [(model, pool.slots, pool.device_kind) for model, pool in self.pools.items()]
                await asyncio.to_thread(self.store.publish_pools, self.owner, pools)
            except Exception:
                log.exception("lease upkeep failed; retrying")
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _renew_leases(self) -> None:
        attempts = {rid: r.claimed.attempt for rid, r in self.running.items()}
        status = await asyncio.to_thread(self.store.heartbeat, self.owner, attempts, self.settings.lease_seconds)
        for render_id in status.lost:
            log.warning("lost the lease of %s; stopping its engine", render_id)
            self._cancel(render_id)
        for render_id in status.cancel_requested:
            self._cancel(render_id)

    async def _cancel_loop(self) -> None:
        # Progress writes already bring back cancel requests; this catches renders
        # that report nothing for a while (waiting in a replica, decoding).
        while True:
            await asyncio.sleep(self.settings.cancel_poll_interval_s)
            if not self.running:
                continue
            try:
                ids = await asyncio.to_thread(self.store.cancel_requested, list(self.running))
            except Exception:
                log.exception("checking for cancels failed")
                continue
            for render_id in ids:
                self._cancel(render_id)

    def _cancel(self, render_id: str) -> None:
        entry = self.running.get(render_id)
        if entry and entry.stream is not None and not entry.cancel_sent:
            entry.cancel_sent = True
            entry.stream.cancel()

    def _publish_running(self) -> None:
        for model in self.pools:
            self.metrics.running(model, self.running_count(model))

    # -- one attempt -----------------------------------------------------------------

    async def _run_attempt(self, entry: _Running) -> None:
        claimed = entry.claimed
        pool = self.pools[claimed.spec.model]
        outcome: AttemptOutcome | None = None
        result: dict[str, Any] = {}
        error: str | None = None
        try:
            entry.stream = pool.render(engine_request(claimed))
            async for batch in entry.stream:
                for event in batch:
                    if event["kind"] == "progress":
                        self._on_progress(entry, pool, event)
                    elif event["kind"] == "done":
                        outcome, result = AttemptOutcome.SUCCEEDED, event
            if outcome is None:
                outcome, error = AttemptOutcome.FAILED, "the engine ended the render without a result"
        except asyncio.CancelledError:
            if self._stopping:
                raise
            outcome = AttemptOutcome.CANCELLED
        except EngineLost as lost:
            if entry.cancel_sent:
                outcome = AttemptOutcome.CANCELLED
            else:
                await self._release(entry, f"engine lost: {lost.message}")
                return
        except Exception as failure:
            if entry.cancel_sent:
                outcome = AttemptOutcome.CANCELLED
            else:
                outcome, error = AttemptOutcome.FAILED, f"{type(failure).__name__}: {failure}"
                log.warning("render %s failed: %s", claimed.id, error)
        await self._finish(entry, outcome, result, error)

    def _on_progress(self, entry: _Running, pool: EnginePool, event: dict[str, Any]) -> None:
        claimed = entry.claimed
        stage = Stage(event["stage"])
        if not entry.engine_started:
            # Queue wait ends when an engine starts on it, not when it was leased.
            entry.engine_started = True
            waited = (utcnow() - claimed.created_at).total_seconds() if claimed.attempt == 1 else None
            self.metrics.attempt_started(claimed, waited)
        for phase, kind, seconds in event.get("finished_phases", ()):
            entry.timings.append(PhaseTiming(phase, kind, seconds))
        if event.get("step_seconds"):
            entry.timings.append(PhaseTiming("DENOISING", pool.device_kind, event["step_seconds"]))
            self.metrics.step_finished(claimed.spec.model, pool.device_kind, event["step_seconds"])
        self._pending.append(
            ProgressUpdate(claimed.id, claimed.attempt, stage, event.get("step", 0), event.get("total_steps", 0))
        )
        self._progress_arrived.set()

    async def _release(self, entry: _Running, reason: str) -> None:
        claimed = entry.claimed
        # What the lost attempt did is recorded, as absorbed by the farm: not charged.
        absorbed = price_timings(self.config.prices, [(t.phase, t.device_kind, t.seconds) for t in entry.timings])
        await self._flush()
        released = await asyncio.to_thread(self.store.release, self.owner, claimed.id, claimed.attempt, reason,
                                           self.settings.max_attempts, absorbed)
        if released:
            self.metrics.attempt_absorbed(claimed.spec.model, absorbed)
        self.running.pop(claimed.id, None)
        self._publish_running()
        self.wake()

    async def _finish(self, entry: _Running, outcome: AttemptOutcome, result: dict[str, Any],
                      error: str | None) -> None:
        claimed = entry.claimed
        if outcome is AttemptOutcome.SUCCEEDED:
            timings = [tuple(t) for t in result["timings"]]
        else:
            # Charged: the work done before the cancel or failure.
            timings = [(t.phase, t.device_kind, t.seconds) for t in entry.timings]
        charges = price_timings(self.config.prices, timings)
        # Progress first, so the final event follows every step event.
        await self._flush()
        record = await asyncio.to_thread(
            self.store.finish, self.owner, claimed.id, claimed.attempt, outcome, charges=charges,
            artifact_uri=result.get("artifact_uri"), manifest_uri=result.get("manifest_uri"), error=error,
            device_kind=result.get("device_kind") or self.pools[claimed.spec.model].device_kind,
            node=result.get("node"), timings=[list(t) for t in timings],
        )
        self.running.pop(claimed.id, None)
        self._publish_running()
        self.wake()
        if record is None:
            log.warning("attempt %s of %s no longer held its lease; not recorded", claimed.attempt, claimed.id)
            return
        duration = (record.finished_at - record.started_at).total_seconds() if record.started_at else None
        frames = claimed.spec.num_frames if outcome is AttemptOutcome.SUCCEEDED else 0
        self.metrics.render_finished(claimed.tenant_name, claimed.spec.model, record.state.value, duration, frames,
                                     charges)
        await self._publish_budget(claimed.tenant_id, claimed.tenant_name)

    async def _publish_budget(self, tenant_id: str, tenant_name: str) -> None:
        status = await asyncio.to_thread(self.store.budget_status, tenant_id)
        if status is not None:
            self.metrics.budget_left(tenant_name, status.left_nanodollars / 1e9)

