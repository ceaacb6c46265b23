"""The scheduler's loop: claim queued renders for free engine slots (priority, then
age), route each to one of its model's pools (by required kind, then estimated finish
time), stream it there, write progress in batches, keep leases alive, cancel on
request, preempt lower classes for urgent work, requeue what was lost, size the pools
from their backlog, and finish each attempt with its charges.

It knows engines only through `EnginePool`, so it runs (and is tested) without Ray;
`farm.serve` wraps Ray Serve deployment handles into pools."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from farm.config import FarmConfig
from farm.domain.engine import EngineRequest, PhaseTiming
from farm.domain.errors import EngineLost, RenderRejected
from farm.domain.spec import ResolvedSpec
from farm.domain.states import AttemptOutcome, Stage
from farm.jobs.autoscale import PoolLoad, assign_backlog, wanted_replicas
from farm.jobs.outages import store_unreachable
from farm.jobs.quarantine import NodeQuarantine
from farm.jobs.records import ClaimedRender, PoolStatus, ProgressUpdate
from farm.jobs.schema import utcnow
from farm.jobs.store import JobStore
from farm.metering.cost import price_timings
from farm.planning.estimate import TimingModel
from farm.planning.memory import fits, pool_capacity

log = logging.getLogger(__name__)
# Where the store announces submits (a doorbell, NOTIFY), the scheduler still looks
# this often: an announcement lost costs at most this much.
PUSHED_FALLBACK_S = 1.0
# An attempt's ending is written again after these (doubling) while the store is unreachable.
STORE_RETRY_FIRST_S = 0.2
STORE_RETRY_MAX_S = 5.0


class RenderStream(Protocol):
    """Events of one attempt from an engine, in lists of dicts (see `farm.serve.engine`)."""

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...

    def cancel(self) -> None: ...


class EnginePool(Protocol):
    """The replicas of one model on one kind of device."""

    model: str
    device_kind: str
    min_replicas: int
    max_replicas: int
    backlog_target_s: float
    relative_speed: float
    preemptible: bool
    """Its engines can checkpoint a render at a step boundary and resume it."""

    @property
    def key(self) -> str:
        """`model/device_kind`."""

    @property
    def slots(self) -> int:
        """Replicas running now: renders the pool can run at once."""

    @property
    def cold_start_s(self) -> float:
        """Seconds a new replica took (or is assumed to take) to start and warm up."""

    def render(self, request: EngineRequest) -> RenderStream: ...

    def preempt(self, render_id: str, attempt: int) -> None:
        """Asks the engine running this attempt to checkpoint at its next step and stop."""

    async def refresh(self) -> None:
        """Re-reads how many replicas are running."""

    def scale_to(self, replicas: int) -> None:
        """Asks for this many replicas (the pool's bounds still apply)."""


class SchedulerMetrics(Protocol):
    def attempt_started(self, claimed: ClaimedRender, queue_wait_s: float | None) -> None: ...

    def step_finished(self, model: str, device_kind: str, seconds: float) -> None: ...

    def render_finished(self, tenant: str, model: str, state: str, duration_s: float | None, frames: int,
                        charges: list) -> None: ...

    def attempt_absorbed(self, model: str, charges: list) -> None: ...

    def budget_left(self, tenant: str, dollars: float) -> None: ...

    def running(self, model: str, count: int) -> None: ...

    def charged(self, tenant: str, model: str, charges: list) -> None: ...

    def pool_sized(self, model: str, device_kind: str, replicas: int, wanted: int, backlog_s: float,
                   cold_start_s: float) -> None: ...

    def preempted(self, model: str, device_kind: str) -> None: ...

    def node_quarantined(self) -> None: ...


class NodeFence(Protocol):
    """Keeps a node's engine replicas from getting renders (see `farm.jobs.quarantine`)."""

    def exclude(self, node: str, until: float) -> None:
        """Until `until` (wall-clock seconds)."""


@dataclasses.dataclass
class _Running:
    claimed: ClaimedRender
    pool: EnginePool
    stream: RenderStream | None = None
    task: asyncio.Task | None = None
    cancel_sent: bool = False
    # Preemption asked of a started render (it checkpoints), or a render taken back
    # from a replica's queue before it started.
    preempt_sent: bool = False
    withdrawn: bool = False
    # Claimed but kept back from its pool until its turn (see Scheduler._may_dispatch).
    held: bool = False
    # The engine has let go of it (a preemption's checkpoint is written).
    engine_done: bool = False
    # Its frames are being post-processed or written: the engine is free for the next.
    postprocessing: bool = False
    engine_started: bool = False
    node: str | None = None
    # Phases finished so far, for charging work done before a cancel.
    timings: list[PhaseTiming] = dataclasses.field(default_factory=list)



def engine_request(claimed: ClaimedRender) -> EngineRequest:
    spec = claimed.spec
    return EngineRequest(
        render_id=claimed.id, attempt=claimed.attempt, task=spec.task, prompt=spec.prompt,
        negative_prompt=spec.negative_prompt, image=spec.image or None, width=spec.width, height=spec.height,
        num_frames=spec.num_frames, fps=spec.fps, num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale, seed=spec.seed, resume_from=claimed.checkpoint_uri,
        postprocess=spec.postprocess, estimated_memory_bytes=spec.memory_bytes, avoid_nodes=claimed.failed_nodes,
    )


class Scheduler:
    def __init__(self, store: JobStore, pools: dict[str, list[EnginePool]], config: FarmConfig, owner: str,
                 metrics: SchedulerMetrics, fence: NodeFence | None = None):
        self.store = store
        self.pools = pools
        self.models = {m.name: m for m in config.served_models()}
        # (model, device kind) -> (when loaded, timing model or None): for routing and backlog.
        self._timing_models: dict[tuple[str, str], tuple[float, TimingModel | None]] = {}
        self._last_wanted: dict[str, int] = {}
        self._capacities: dict[str, int | None] = {}
        self._engine_freed = asyncio.Event()
        self._lease_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="leases")
        self.config = config
        self.settings = config.scheduler
        self.owner = owner
        self.metrics = metrics
        self.fence = fence
        self.quarantine = NodeQuarantine(self.settings.quarantine_after_failures, self.settings.quarantine_window_s,
                                         self.settings.quarantine_s)
        self.running: dict[str, _Running] = {}
        self._pending: list[ProgressUpdate] = []
        self._progress_arrived = asyncio.Event()
        self._wake = asyncio.Event()
        self._changes = None
        self._maybe_more = True
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._changes = self.store.change_detector(on_change=lambda: loop.call_soon_threadsafe(self.wake))
        loops = (self._claim_loop, self._flush_loop, self._lease_loop, self._cancel_loop, self._autoscale_loop)
        self._tasks = [asyncio.create_task(loop(), name=loop.__name__) for loop in loops]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush()
        if self._changes is not None:
            self._changes.close()
        self._lease_executor.shutdown(wait=False)

    def wake(self) -> None:
        self._maybe_more = True
        self._wake.set()

    def running_count(self, model: str) -> int:
        return sum(1 for r in self.running.values() if r.claimed.spec.model == model)

    def _on_pool(self, pool: EnginePool) -> list[_Running]:
        return [r for r in self.running.values() if r.pool is pool]

    def all_pools(self) -> list[EnginePool]:
        return [pool for pools in self.pools.values() for pool in pools]

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
                # With every slot busy only a finishing render can make room (no polling),
                # unless an urgent render may arrive and preempt one. Where the store
                # announces submits, the poll is only a fallback for a lost announcement.
                preempting = any(c.preempts for c in self.settings.priority_classes)
                interval = PUSHED_FALLBACK_S if self._changes.pushed else self.settings.poll_interval_s
                timeout = interval if self._free_slots() or preempting else None
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass

    @staticmethod
    def _needs_engine(entry: _Running) -> bool:
        """Rendering, or waiting to (held, prefetched): not yet past the engine."""
        return not (entry.engine_done or entry.postprocessing)

    def _pool_room(self, pool: EnginePool) -> int:
        """Renders the pool can take now: each replica renders one and holds
        `prefetch_per_replica` more, and may hold `postprocessing_per_replica` whose
        frames are being post-processed (they do not keep its engine from the next)."""
        held = self._on_pool(pool)
        engine_room = pool.slots * (1 + self.settings.prefetch_per_replica) - sum(map(self._needs_engine, held))
        return min(engine_room, pool.slots * self.settings.renders_per_replica - len(held))

    def _free_slots(self) -> dict[str, int]:
        free = {model: sum(max(self._pool_room(p), 0) for p in pools) for model, pools in self.pools.items()}
        return {model: slots for model, slots in free.items() if slots > 0}

    def _free_kinds(self) -> dict[str, list[str]]:
        return {model: [p.device_kind for p in pools if self._pool_room(p) > 0] for model, pools in self.pools.items()}

    async def _claim_once(self) -> int:
        free = self._free_slots()
        # Cheap checks first: an idle farm must not spend a core polling the store.
        if not (self._changes.changed() or self._maybe_more):
            return 0
        self._maybe_more = False
        claimed = []
        if free:
            claimed = await asyncio.to_thread(self._claim_queued, free, self._free_kinds(), self._free_memory())
            # Slots filled up: more may be queued than was claimed; look again when one frees.
            self._maybe_more = len(claimed) >= sum(free.values())
            for render in claimed:
                entry = _Running(render, self._route(render))
                self.running[render.id] = entry
                entry.task = asyncio.create_task(self._run_attempt(entry), name=f"render-{render.id}")
            self._publish_running()
        # After the claim, off the path of a render that starts at once: an urgent render
        # that got a free engine needs no preemption, and one claimed that waits behind
        # others in a replica counts as waiting.
        await self._preempt_for_waiting()
        return len(claimed)

    def _claim_queued(self, free: dict[str, int], kinds: dict[str, list[str]],
                      memory: dict[str, int | None]) -> list[ClaimedRender]:
        """In one trip to a store thread: a cheap look for queued work, then the claim,
        which takes the write lock only when there is some."""
        if not self.store.has_queued(list(free)):
            return []
        return self.store.claim(free, self.owner, self.settings.lease_seconds, kinds, memory)

    # -- routing -----------------------------------------------------------------------

    def _timing(self, model: str, device_kind: str) -> TimingModel | None:
        cached = self._timing_models.get((model, device_kind))
        return cached[1] if cached else None

    def estimate_seconds(self, spec: ResolvedSpec, pool: EnginePool) -> float:
        """Device-seconds the render would take on the pool: its calibrated cost model,
        else the fallback model scaled by the pool's relative speed."""
        model = self.models.get(spec.model)
        if model is None:
            return 0.0
        timing = self._timing(spec.model, pool.device_kind)
        if timing is not None:
            return sum(timing.phase_seconds(spec, model).values())
        return sum(TimingModel.fallback().phase_seconds(spec, model).values()) / pool.relative_speed

    def _remaining_seconds(self, entry: _Running) -> float:
        spec = entry.claimed.spec
        total = self.estimate_seconds(spec, entry.pool)
        done = sum(t.seconds for t in entry.timings)
        return max(total - done, 0.0)

    def _route(self, claimed: ClaimedRender) -> EnginePool:
        """The pool with room where the render would finish first (work already on
        the pool spread over its replicas, plus the render itself); the preferred kind
        wins a tie. A render that requires a kind goes only there."""
        spec = claimed.spec
        holding = self._pools_it_fits(spec)
        pools = [p for p in holding if self._pool_room(p) > 0]
        if spec.require_device_kind:
            pools = [p for p in pools if p.device_kind == spec.require_device_kind]
        pools = pools or holding

        def finish(pool: EnginePool) -> tuple[float, bool]:
            ahead = sum(self._remaining_seconds(r) for r in self._on_pool(pool)) / max(pool.slots, 1)
            return ahead + self.estimate_seconds(spec, pool), pool.device_kind != spec.prefer_device_kind

        return min(pools, key=finish)

    # -- device memory -----------------------------------------------------------------

    def _capacity(self, pool: EnginePool) -> int | None:
        """GPU memory a replica of the pool may use (None: not checked, e.g. a CPU pool)."""
        if pool.key not in self._capacities:
            self._capacities[pool.key] = pool_capacity(self.models[pool.model], pool.device_kind,
                                                       self.config.devices)
        return self._capacities[pool.key]

    def _pools_it_fits(self, spec: ResolvedSpec) -> list[EnginePool]:
        """The model's pools whose devices hold the render (the memory the gateway
        estimated at submit); all of them if none does (it was queued before the
        config changed: it runs rather than waiting for ever)."""
        pools = self.pools[spec.model]
        return [p for p in pools if fits(spec.memory_bytes, self._capacity(p))] or pools

    def _free_memory(self) -> dict[str, int | None]:
        """Per model, the most memory a claimed render may need: that of its largest
        pool with room (None when one of them is not checked), so that a render no pool
        with room can hold stays queued instead of piling onto a full pool."""
        free: dict[str, int | None] = {}
        for model, pools in self.pools.items():
            capacities = [self._capacity(p) for p in pools if self._pool_room(p) > 0]
            if capacities:
                free[model] = None if None in capacities else max(capacities)
        return free

    # -- preemption --------------------------------------------------------------------

    async def _preempt_for_waiting(self) -> None:
        """Makes room for renders of a preempting class: when one waits (queued, or
        dispatched but stuck behind others in a replica's queue) and every engine of
        the pools it may use is busy with a lower class, lower-class renders still
        waiting in those replicas' queues are taken back (no cost), and one denoising
        lower-class render per waiting urgent one checkpoints at its next step."""
        settings = self.settings
        if not any(c.preempts for c in settings.priority_classes):
            return
        lowest_preempting = min(c.min_priority for c in settings.priority_classes if c.preempts)
        queued = await asyncio.to_thread(self.store.best_queued, list(self.pools), lowest_preempting)
        for model, pools in self.pools.items():
            waiting = [(r.claimed.spec.priority, r.claimed.spec.require_device_kind or None, r.claimed.spec.memory_bytes)
                       for r in self.running.values()
                       if r.claimed.spec.model == model and not r.engine_started and not r.withdrawn]
            if model in queued:
                waiting.append(queued[model])
            urgent = [u for u in waiting if settings.priority_class(u[0]).preempts]
            if not urgent:
                continue
            priority, required, memory = max(urgent, key=lambda u: u[0])
            rank = settings.class_rank(priority)
            # Only an engine that can run it is worth freeing: of the kind it requires, holding its memory.
            eligible = [p for p in pools if not required or p.device_kind == required]
            eligible = [p for p in eligible if fits(memory, self._capacity(p))] or eligible
            on_eligible = [r for r in self.running.values() if r.pool in eligible and not r.cancel_sent]
            lower = [r for r in on_eligible if settings.class_rank(r.claimed.spec.priority) < rank]
            for entry in lower:
                # Held renders are not in a replica's way; dispatched ones waiting there are.
                if entry.stream is not None and not entry.engine_started and not entry.withdrawn:
                    entry.withdrawn = True
                    if entry.stream is not None:
                        entry.stream.cancel()
            engines = sum(p.slots for p in eligible)
            # Renders past the engine (post-processing) hold no engine and cannot be preempted.
            rendering = [r for r in on_eligible if self._needs_engine(r)]
            busy = sum(1 for r in rendering if r.engine_started and not r.preempt_sent and not r.withdrawn)
            waiting_urgent = sum(1 for u in urgent if settings.class_rank(u[0]) >= rank)
            needed = waiting_urgent - (engines - busy)
            victims = sorted(
                (r for r in rendering if r in lower and r.engine_started and not r.preempt_sent and not r.withdrawn
                 and r.pool.preemptible and r.claimed.preemptions < settings.max_preemptions),
                key=lambda r: (r.claimed.spec.priority, -r.claimed.claimed_at.timestamp()))
            for victim in victims[:max(needed, 0)]:
                victim.preempt_sent = True
                log.info("preempting %s (priority %d) for a priority-%d render of %s", victim.claimed.id,
                         victim.claimed.spec.priority, priority, model)
                await asyncio.to_thread(victim.pool.preempt, victim.claimed.id, victim.claimed.attempt)
                self.metrics.preempted(model, victim.pool.device_kind)

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
                requeued = await self._lease_call(self.store.requeue_expired, self.settings.max_attempts)
                if requeued:
                    log.warning("requeued renders whose lease expired: %s", requeued)
                    self.wake()
                pools = [PoolStatus(p.model, p.device_kind, p.slots, p.min_replicas, p.max_replicas)
                         for p in self.all_pools()]
                await asyncio.to_thread(self.store.publish_pools, self.owner, pools)
            except Exception:
                log.exception("lease upkeep failed; retrying")
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _renew_leases(self) -> None:
        attempts = {rid: r.claimed.attempt for rid, r in self.running.items()}
        status = await self._lease_call(self.store.heartbeat, self.owner, attempts, self.settings.lease_seconds)
        for render_id in status.lost:
            entry = self.running.get(render_id)
            # The attempt asked about may have ended (and the render been claimed again)
            # while the heartbeat ran: only that attempt lost its lease, not the new one.
            if entry is not None and entry.claimed.attempt == attempts[render_id]:
                log.warning("lost the lease of %s; stopping its engine", render_id)
                self._cancel(render_id)
        for render_id in status.cancel_requested:
            self._cancel(render_id)

    async def _autoscale_loop(self) -> None:
        """Sizes every pool from the work queued for it: the backlog in estimated
        device-seconds (queued renders spread over the pools that may run them, each
        to where it would finish first), its target time, the busy replicas and the
        cold start of a new replica."""
        while True:
            try:
                await self._autoscale_once()
            except Exception:
                log.exception("autoscaling failed; retrying")
            await asyncio.sleep(self.settings.autoscale_interval_s)

    async def _autoscale_once(self) -> None:
        await self._refresh_timing_models()
        for pool in self.all_pools():
            await pool.refresh()
        queued = await asyncio.to_thread(self.store.queued_specs, list(self.pools))
        by_model: dict[str, list] = {}
        for spec, required, done_steps in queued:
            pools = self.pools.get(spec.model, [])
            left = 1 - done_steps / max(spec.num_inference_steps, 1)
            seconds_on = {p.key: self.estimate_seconds(spec, p) * left for p in self._pools_it_fits(spec)}
            by_model.setdefault(spec.model, []).append(
                (seconds_on, next((p.key for p in pools if p.device_kind == required), None) if required else None))
        depth = 1 + self.settings.prefetch_per_replica
        for model, pools in self.pools.items():
            backlog = assign_backlog(by_model.get(model, []), {p.key: p.max_replicas for p in pools})
            for pool in pools:
                rendering = sum(map(self._needs_engine, self._on_pool(pool)))
                busy = -(-rendering // depth)  # ceil: replicas whose engines have renders
                load = PoolLoad(pool.key, pool.slots, busy, pool.min_replicas, pool.max_replicas,
                                backlog.get(pool.key, 0.0), pool.backlog_target_s, pool.cold_start_s)
                wanted = wanted_replicas(load)
                if wanted != self._last_wanted.get(pool.key):
                    log.info("pool %s: %d replicas, %d busy, %.1f s queued -> wants %d", pool.key, pool.slots,
                             busy, load.backlog_seconds, wanted)
                    self._last_wanted[pool.key] = wanted
                pool.scale_to(wanted)
                self.metrics.pool_sized(model, pool.device_kind, pool.slots, wanted, load.backlog_seconds,
                                        pool.cold_start_s)
        self.wake()  # replicas may have come up

    async def _refresh_timing_models(self) -> None:
        now = asyncio.get_running_loop().time()
        for pool in self.all_pools():
            key = (pool.model, pool.device_kind)
            cached = self._timing_models.get(key)
            if cached is not None and now - cached[0] < 30:
                continue
            stored = await asyncio.to_thread(self.store.cost_model, *key)
            self._timing_models[key] = (now, TimingModel.from_json(stored) if stored else None)

    async def _lease_call(self, fn, *args):
        # Leases get a thread of their own: were they to wait behind slow calls in the
        # shared pool, the scheduler would let its own leases expire and requeue them.
        return await asyncio.get_running_loop().run_in_executor(self._lease_executor, fn, *args)

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
        pool = entry.pool
        outcome: AttemptOutcome | None = None
        result: dict[str, Any] = {}
        error: str | None = None
        node_fault = False
        await self._wait_for_turn(entry)
        if entry.withdrawn:
            await self._preempted(entry, {"step": 0}, counted=False)
            return
        try:
            entry.stream = pool.render(engine_request(claimed))
            if entry.withdrawn:
                entry.stream.cancel()
            async for batch in entry.stream:
                for event in batch:
                    if event["kind"] == "progress":
                        self._on_progress(entry, pool, event)
                    elif event["kind"] == "done":
                        outcome, result = AttemptOutcome.SUCCEEDED, event
                    elif event["kind"] == "preempted":
                        outcome, result = AttemptOutcome.PREEMPTED, event
                        # Its engine is free now: the waiting render goes before the store write.
                        entry.engine_done = True
                        self._engine_freed.set()
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
                self._node_failed(entry.node, claimed.id, f"engine lost: {lost.message}")
                await self._write_ending(entry, functools.partial(self._release, entry, f"engine lost: {lost.message}"))
                return
        except Exception as failure:
            if entry.cancel_sent:
                outcome = AttemptOutcome.CANCELLED
            else:
                outcome, error = AttemptOutcome.FAILED, f"{type(failure).__name__}: {failure}"
                # What the render asked for fails anywhere; anything else may be the node's fault.
                node_fault = not isinstance(failure, (RenderRejected, ValueError, TypeError))
                log.warning("render %s failed on %s: %s", claimed.id, entry.node or pool.key, error)
                if node_fault:
                    self._node_failed(entry.node, claimed.id, error)
        if entry.withdrawn and outcome is not AttemptOutcome.SUCCEEDED and not entry.cancel_sent:
            ending = functools.partial(self._preempted, entry, {"step": 0}, counted=False)
        elif outcome is AttemptOutcome.PREEMPTED:
            ending = functools.partial(self._preempted, entry, result)
        elif outcome is AttemptOutcome.FAILED and entry.engine_started and node_fault:
            # Failing mid-render can be the node's fault: try another before giving up
            # (the store gives up after `failed_node_limit` failed attempts, wherever they ran).
            ending = functools.partial(self._retry_elsewhere, entry, error or "failed")
        else:
            ending = functools.partial(self._finish, entry, outcome, result, error)
        await self._write_ending(entry, ending)

    async def _write_ending(self, entry: _Running, write: Callable[[], Awaitable[None]]) -> None:
        """Writes how the attempt ended, again and again while the store cannot be reached:
        given up, the render would stay RUNNING for good, its lease renewed by this
        scheduler with no attempt behind it. Each write is fenced by the lease, so one that
        committed before its connection died is not recorded twice."""
        delay = STORE_RETRY_FIRST_S
        while True:
            try:
                await write()
                return
            except Exception as error:
                if not store_unreachable(error):
                    # Not an outage: stop renewing its lease, so it expires and the render is requeued.
                    log.exception("render %s: its ending could not be written; its lease will expire",
                                  entry.claimed.id)
                    self._forget(entry.claimed.id)
                    return
                log.warning("render %s: the store is unreachable (%s); writing its ending again in %.1f s",
                            entry.claimed.id, error.__class__.__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_MAX_S)

    def _node_failed(self, node: str | None, render_id: str, reason: str) -> None:
        """Counts a failure that may be the node's; enough of them (of different renders)
        keep it out of its pools."""
        until = None if node is None else self.quarantine.record_failure(node, render_id)
        if until is None:
            return
        log.warning("node %s quarantined for %.0f s after %d renders failed there in %.0f s (the last: %s)", node,
                    self.settings.quarantine_s, self.settings.quarantine_after_failures,
                    self.settings.quarantine_window_s, reason)
        self.metrics.node_quarantined()
        if self.fence is not None:
            try:
                self.fence.exclude(node, until)
            except Exception:  # the renders still retry elsewhere; the fence is best effort
                log.exception("could not fence node %s", node)

    def _on_progress(self, entry: _Running, pool: EnginePool, event: dict[str, Any]) -> None:
        claimed = entry.claimed
        stage = Stage(event["stage"])
        entry.node = event.get("node") or entry.node
        if not entry.engine_started:
            # Queue wait ends when an engine starts on it, not when it was leased.
            entry.engine_started = True
            waited = (utcnow() - claimed.created_at).total_seconds() if claimed.attempt == 1 else None
            self.metrics.attempt_started(claimed, waited)
        postprocessing = stage in (Stage.POSTPROCESSING, Stage.WRITING)
        if postprocessing != entry.postprocessing:
            # (A quality-gate retry takes a render back into the engine.)
            entry.postprocessing = postprocessing
            if postprocessing:
                self._engine_freed.set()
                self.wake()  # its engine can start the next render
        for phase, kind, seconds in event.get("finished_phases", ()):
            entry.timings.append(PhaseTiming(phase, kind, seconds))
        if event.get("step_seconds"):
            entry.timings.append(PhaseTiming("DENOISING", pool.device_kind, event["step_seconds"]))
            self.metrics.step_finished(claimed.spec.model, pool.device_kind, event["step_seconds"])
        self._pending.append(
            ProgressUpdate(claimed.id, claimed.attempt, stage, event.get("step", 0), event.get("total_steps", 0),
                           at=event.get("at"))
        )
        self._progress_arrived.set()

    def _forget(self, render_id: str) -> None:
        """The attempt is over (recorded): its engine and its slot are free."""
        self.running.pop(render_id, None)
        self._publish_running()
        self._engine_freed.set()
        self.wake()

    def _may_dispatch(self, entry: _Running) -> bool:
        """A render of a preempting class goes to its pool only when an engine there is
        idle: sent into a busy replica's queue it would wait behind a render that is not
        being preempted. Meanwhile no lower-class render is sent ahead of it."""
        settings = self.settings
        rank = settings.class_rank(entry.claimed.spec.priority)
        others = [r for r in self._on_pool(entry.pool) if r is not entry]
        if any(not r.engine_started and settings.class_rank(r.claimed.spec.priority) > rank for r in others):
            return False
        if not settings.priority_class(entry.claimed.spec.priority).preempts:
            return True
        # A preempted render holds its engine until it has written its checkpoint.
        dispatched = sum(1 for r in others if r.stream is not None and not r.withdrawn and self._needs_engine(r))
        return dispatched < entry.pool.slots

    async def _wait_for_turn(self, entry: _Running) -> None:
        entry.held = True
        try:
            while not self._stopping and not entry.withdrawn and not self._may_dispatch(entry):
                self._engine_freed.clear()
                self.wake()  # the claim loop decides preemptions
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._engine_freed.wait(), self.settings.heartbeat_interval_s)
        finally:
            entry.held = False

    def _done_timings(self, entry: _Running) -> list[tuple[str, str, float]]:
        return [(t.phase, t.device_kind, t.seconds) for t in entry.timings]

    async def _preempted(self, entry: _Running, event: dict[str, Any], counted: bool = True) -> None:
        """The attempt gave its engine up: charge what it did, queue it again with its
        checkpoint (none when it was taken back before it started: not counted)."""
        claimed = entry.claimed
        timings = [tuple(t) for t in event["timings"]] if event.get("timings") else self._done_timings(entry)
        charges = price_timings(self.config.prices, timings)
        await self._flush()
        recorded = await asyncio.to_thread(
            self.store.preempt, self.owner, claimed.id, claimed.attempt, checkpoint_uri=event.get("checkpoint_uri"),
            step=int(event.get("step", 0)), charges=charges, device_kind=entry.pool.device_kind,
            node=event.get("node") or entry.node, timings=[list(t) for t in timings], counted=counted,
            checkpoint_seconds=event.get("checkpoint_seconds"))
        if recorded:
            self.metrics.charged(claimed.tenant_name, claimed.spec.model, charges)
        self._forget(claimed.id)

    async def _retry_elsewhere(self, entry: _Running, error: str) -> None:
        claimed = entry.claimed
        timings = self._done_timings(entry)
        charges = price_timings(self.config.prices, timings)
        await self._flush()
        record = await asyncio.to_thread(
            self.store.retry_elsewhere, self.owner, claimed.id, claimed.attempt, error=error, node=entry.node,
            failed_node_limit=self.settings.failed_node_limit, charges=charges, device_kind=entry.pool.device_kind,
            timings=[list(t) for t in timings])
        self._forget(claimed.id)
        if record is None:
            return
        if record.state.is_final:
            duration = (record.finished_at - record.started_at).total_seconds() if record.started_at else None
            self.metrics.render_finished(claimed.tenant_name, claimed.spec.model, record.state.value, duration, 0,
                                         charges)
            await self._publish_budget(claimed.tenant_id, claimed.tenant_name)
        else:
            self.metrics.charged(claimed.tenant_name, claimed.spec.model, charges)

    async def _release(self, entry: _Running, reason: str) -> None:
        claimed = entry.claimed
        # What the lost attempt did is recorded, as absorbed by the farm: not charged.
        absorbed = price_timings(self.config.prices, self._done_timings(entry))
        await self._flush()
        released = await asyncio.to_thread(self.store.release, self.owner, claimed.id, claimed.attempt, reason,
                                           self.settings.max_attempts, absorbed, entry.node, entry.pool.device_kind)
        if released:
            self.metrics.attempt_absorbed(claimed.spec.model, absorbed)
        self._forget(claimed.id)

    async def _finish(self, entry: _Running, outcome: AttemptOutcome, result: dict[str, Any],
                      error: str | None) -> None:
        claimed = entry.claimed
        if outcome is AttemptOutcome.SUCCEEDED:
            timings = [tuple(t) for t in result["timings"]]
        else:
            # Charged: the work done before the cancel or failure.
            timings = [(t.phase, t.device_kind, t.seconds) for t in entry.timings]
        charges = price_timings(self.config.prices, timings)
        # Its progress not yet written goes in the same transaction, before the final
        # event (a transaction less between the engine's result and the client).
        progress = [u for u in self._pending if u.render_id == claimed.id]
        self._pending = [u for u in self._pending if u.render_id != claimed.id]
        try:
            record = await asyncio.to_thread(
                self.store.finish, self.owner, claimed.id, claimed.attempt, outcome, charges=charges,
                artifact_uri=result.get("artifact_uri"), manifest_uri=result.get("manifest_uri"), error=error,
                device_kind=result.get("device_kind") or entry.pool.device_kind,
                node=result.get("node") or entry.node, timings=[list(t) for t in timings],
                quality=result.get("quality"), candidates=result.get("candidates"), progress=progress,
            )
        except Exception:
            self._pending = progress + self._pending
            raise
        self._forget(claimed.id)
        if record is None:
            log.warning("attempt %s of %s no longer held its lease; not recorded", claimed.attempt, claimed.id)
            return
        if claimed.checkpoint_uri:
            from farm.storage.artifacts import ArtifactStore

            # Final: the denoising checkpoints of its preemptions are of no more use.
            await asyncio.to_thread(ArtifactStore(self.config.artifacts_url).discard_checkpoints, claimed.id)
        duration = (record.finished_at - record.started_at).total_seconds() if record.started_at else None
        frames = claimed.spec.num_frames if outcome is AttemptOutcome.SUCCEEDED else 0
        self.metrics.render_finished(claimed.tenant_name, claimed.spec.model, record.state.value, duration, frames,
                                     charges)
        await self._publish_budget(claimed.tenant_id, claimed.tenant_name)

    async def _publish_budget(self, tenant_id: str, tenant_name: str) -> None:
        status = await asyncio.to_thread(self.store.budget_status, tenant_id)
        if status is not None:
            self.metrics.budget_left(tenant_name, status.left_nanodollars / 1e9)

