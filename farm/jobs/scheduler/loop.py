"""The scheduler's loops over the attempts it holds: claim queued renders for the room
its pools have (`placement`), send each to its pool in its turn and read the attempt's
typed events back (progress, `Done`, `Preempted`), keep leases alive and requeue what
expired, cancel on request, make room for urgent work (`preemption`), size the pools
from their backlog (`autoscale`), keep failing nodes out (`quarantine`), and end each
attempt (`outcomes`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging

from farm import tracing
from farm.config import FarmConfig
from farm.domain.errors import EngineLost
from farm.domain.events import Done, Preempted, RenderProgress
from farm.domain.states import AttemptOutcome, Stage
from farm.jobs.records import ClaimedRender, PoolStatus, ProgressUpdate
from farm.jobs.schema import utcnow
from farm.jobs.scheduler.attempt import RunningAttempt, engine_request
from farm.jobs.scheduler.autoscale import PoolLoad, assign_grouped_backlog, wanted_replicas
from farm.jobs.scheduler.outcomes import AttemptEndings, Ending, Release, Requeue, ending_of, is_the_render_at_fault
from farm.jobs.scheduler.placement import Placement
from farm.jobs.scheduler.preemption import may_dispatch, plan_preemptions
from farm.jobs.scheduler.progress import ProgressBuffer
from farm.jobs.scheduler.protocols import EnginePool, NodeFence, SchedulerMetrics
from farm.jobs.scheduler.quarantine import NodeQuarantine
from farm.jobs.store import JobStore
from farm.jobs.store.retention import PRUNE_BATCHES_PER_ROUND
from farm.planning.estimate import TimingModel

log = logging.getLogger(__name__)
# Where the store announces submits (a doorbell, NOTIFY), the scheduler still looks
# this often: an announcement lost costs at most this much.
PUSHED_FALLBACK_S = 1.0
# A pool's timing model is read from the store again after this long.
TIMING_MODEL_TTL_S = 30.0


class Scheduler:
    """Runs in an event loop: `start()` its loops, `stop()` them. `running` holds the
    attempts it has claimed (render id -> attempt); read it, never change it."""

    def __init__(self, store: JobStore, pools: dict[str, list[EnginePool]], config: FarmConfig, owner: str,
                 metrics: SchedulerMetrics, fence: NodeFence | None = None):
        self.store = store
        self.pools = pools
        self.config = config
        self.settings = config.scheduler
        self.owner = owner
        self.metrics = metrics
        self.fence = fence
        self.quarantine = NodeQuarantine(self.settings.quarantine_after_failures, self.settings.quarantine_window_s,
                                         self.settings.quarantine_s)
        self.running: dict[str, RunningAttempt] = {}
        self.placement = Placement(pools, config, self.running)
        self.progress = ProgressBuffer(store, owner, self.settings.event_flush_interval_s, self._cancel,
                                       lambda: self.metrics.store_error("progress"))
        self.endings = AttemptEndings(store, owner, config, metrics, self.progress, self._forget)
        # (model, device kind) -> when its timing model was last read from the store
        self._timing_read_at: dict[tuple[str, str], float] = {}
        self._last_wanted: dict[str, int] = {}
        self._engine_freed = asyncio.Event()
        self._attempt_ended = asyncio.Event()
        # Every attempt's task until it returns: its ending's last steps (discarding
        # checkpoints, metrics) run after its slot is freed.
        self._attempt_tasks: set[asyncio.Task] = set()
        self._lease_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="leases")
        self._wake = asyncio.Event()
        self._claiming = asyncio.Lock()
        self._changes = None
        self._maybe_more = True
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._draining = False
        self._prune_at: float | None = None  # loop time of the next prune (None: at the first round)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._changes = self.store.change_detector(on_change=lambda: loop.call_soon_threadsafe(self.wake))
        loops = (self._claim_loop, self.progress.run, self._lease_loop, self._cancel_loop, self._autoscale_loop)
        self._tasks = [asyncio.create_task(loop(), name=loop.__name__) for loop in loops]

    async def drain(self, timeout_s: float) -> None:
        """Stops claiming and hands every render it holds back to the queue, then stops: a
        started render on a pool that checkpoints is preempted (the next attempt resumes
        from its checkpoint), one not yet started is withdrawn, and one being
        post-processed may finish. What is still running after `timeout_s` is withdrawn
        (a started one as lost: its work is absorbed, not charged). Returns when every
        ending is written (or `timeout_s` more has passed)."""
        self._draining = True
        for task in self._tasks:
            if task.get_name() in ("_claim_loop", "_autoscale_loop"):
                task.cancel()
        loop = asyncio.get_running_loop()
        for force, wait_s in ((False, timeout_s), (True, timeout_s)):
            deadline = loop.time() + wait_s
            for entry in list(self.running.values()):
                await self._hand_back(entry, force)
            while self.running and loop.time() < deadline:
                self._attempt_ended.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._attempt_ended.wait(), deadline - loop.time())
            if not self.running:
                break
        if self.running:
            log.warning("stopped with renders still held (their leases expire and requeue them): %s",
                        sorted(self.running))
        else:
            log.info("every render this scheduler held is back in the queue or finished")
        await self.stop()

    async def _hand_back(self, entry: RunningAttempt, force: bool) -> None:
        entry.handed_back = True
        if entry.postprocessing and not force:
            return  # past the engine: it ends in moments
        claimed = entry.claimed
        if entry.engine_started and entry.pool.preemptible and not force:
            if not entry.preempt_sent:
                entry.preempt_sent = True
                log.info("stopping: preempting %s, which resumes from its checkpoint", claimed.id)
                await asyncio.to_thread(entry.pool.preempt, claimed.id, claimed.attempt)
        elif not entry.withdrawn:
            entry.withdrawn = True
            if entry.stream is not None:
                entry.stream.cancel()

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.progress.flush()
        if self._changes is not None:
            self._changes.close()
        self._lease_executor.shutdown(wait=False)

    def wake(self) -> None:
        """Something may be claimable: the claim loop looks now."""
        self._maybe_more = True
        self._wake.set()

    async def claim_pass(self) -> int:
        """Claims queued renders for the room the pools have now, sends them on their way
        and makes room for waiting urgent ones, as the claim loop does each time the store
        changes or a slot frees; returns how many renders it claimed. When it returns,
        every render that could be claimed has been (after `start()`; passes never overlap)."""
        return await self._claim_once(look=True)

    async def wait_idle(self) -> None:
        """Returns once the scheduler holds no attempt: each one it claimed has ended, its
        ending is written and its task has returned (a render that ending queued again may
        be claimed after)."""
        while self.running or self._attempt_tasks:
            if not self.running:
                await asyncio.wait(set(self._attempt_tasks))
                continue
            self._attempt_ended.clear()
            await self._attempt_ended.wait()

    async def autoscale_pass(self) -> None:
        """Asks every pool for the replicas its backlog and busy replicas want, as the
        autoscaling loop does every `autoscale_interval_s`."""
        await self._autoscale_once()

    def running_count(self, model: str) -> int:
        return sum(1 for r in self.running.values() if r.claimed.spec.model == model)

    def running_on(self, pool: EnginePool) -> list[RunningAttempt]:
        """The attempts placed on the pool (rendering, waiting there, or post-processed)."""
        return self.placement.on_pool(pool)

    def all_pools(self) -> list[EnginePool]:
        return self.placement.all_pools()

    # -- claiming --------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            # Cleared before the pass reads the store, not after it: a wake-up that arrives
            # during the pass (a submit it did not see) brings another pass at once.
            self._wake.clear()
            try:
                claimed = await self._claim_once()
            except Exception:
                self.metrics.store_error("claim")
                log.exception("claiming renders failed; retrying")
                # What woke this pass is not seen yet: the next one looks again (else, with
                # nothing more changing, a render would wait for good).
                self._maybe_more = True
                claimed = 0
            if not claimed:
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

    async def _claim_once(self, look: bool = False) -> int:
        """look: query the store even when nothing says it changed."""
        async with self._claiming:
            free = self._free_slots()
            # Cheap checks first: an idle farm must not spend a core polling the store.
            if not (look or self._changes.changed() or self._maybe_more):
                return 0
            self._maybe_more = False
            claimed = []
            if free:
                claimed = await asyncio.to_thread(self._claim_queued, free, self._free_kinds(), self._free_memory())
                # Slots filled up: more may be queued than was claimed; look again when one frees.
                # (Never reset here: a wake-up during the claim asks the next pass to look.)
                if len(claimed) >= sum(free.values()):
                    self._maybe_more = True
                for render in claimed:
                    entry = RunningAttempt(render, self._route(render))
                    self.running[render.id] = entry
                    entry.task = asyncio.create_task(self._run_attempt(entry), name=f"render-{render.id}")
                    self._attempt_tasks.add(entry.task)
                    entry.task.add_done_callback(self._attempt_tasks.discard)
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

    # What the claim asks of placement: the room per model, the kinds with room, the
    # memory a claimed render may need, and the pool each claimed render goes to.

    def _free_slots(self) -> dict[str, int]:
        return self.placement.free_slots()

    def _free_kinds(self) -> dict[str, list[str]]:
        return self.placement.free_kinds()

    def _free_memory(self) -> dict[str, int | None]:
        return self.placement.free_memory()

    def _route(self, claimed: ClaimedRender) -> EnginePool:
        return self.placement.route(claimed)

    # -- preemption --------------------------------------------------------------------

    async def _preempt_for_waiting(self) -> None:
        """Carries out the preemption plan of every model with urgent renders waiting
        (see `farm.jobs.scheduler.preemption`)."""
        settings = self.settings
        if not any(c.preempts for c in settings.priority_classes):
            return
        lowest_preempting = min(c.min_priority for c in settings.priority_classes if c.preempts)
        queued = await asyncio.to_thread(self.store.best_queued, list(self.pools), lowest_preempting)
        for model, pools in self.pools.items():
            attempts = [r for r in self.running.values() if r.claimed.spec.model == model]
            plan = plan_preemptions(settings, pools, attempts, queued.get(model), self.placement.capacity)
            if plan is None:
                continue
            for entry in plan.withdraw:
                entry.withdrawn = True
                entry.stream.cancel()
            for victim in plan.preempt:
                victim.preempt_sent = True
                log.info("preempting %s (priority %d) for a priority-%d render of %s", victim.claimed.id,
                         victim.claimed.spec.priority, plan.priority, model)
                await asyncio.to_thread(victim.pool.preempt, victim.claimed.id, victim.claimed.attempt)
                self.metrics.preempted(model, victim.pool.device_kind)

    async def _wait_for_turn(self, entry: RunningAttempt) -> None:
        entry.held = True
        try:
            while not self._stopping and not entry.withdrawn and not may_dispatch(
                    self.settings, entry, [r for r in self.running_on(entry.pool) if r is not entry]):
                self._engine_freed.clear()
                self.wake()  # the claim loop decides preemptions
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._engine_freed.wait(), self.settings.heartbeat_interval_s)
        finally:
            entry.held = False

    # -- one attempt -----------------------------------------------------------------

    async def _run_attempt(self, entry: RunningAttempt) -> None:
        claimed = entry.claimed
        if claimed.attempt == 1:
            # The queue wait of a requeued render starts at its requeue, which is not kept.
            tracing.start_span("scheduler queued", claimed.trace_parent, start_time=claimed.created_at,
                               attributes={"farm.render_id": claimed.id}).end()
        with tracing.span(f"scheduler attempt {claimed.attempt}", claimed.trace_parent, attributes={
                "farm.render_id": claimed.id, "farm.attempt": claimed.attempt, "farm.model": claimed.spec.model,
                "farm.device_kind": entry.pool.device_kind}) as entry.span:
            await self._wait_for_turn(entry)
            ending = Requeue() if entry.withdrawn else await self._render(entry)
            entry.span.set_attribute("farm.ending", type(ending).__name__)
            if entry.node:
                entry.span.set_attribute("farm.node", entry.node)
            await self.endings.write(entry, ending)

    async def _render(self, entry: RunningAttempt) -> Ending:
        """Sends the attempt to its pool and reads its events until the stream ends."""
        claimed = entry.claimed
        outcome: AttemptOutcome | None = None
        final: Done | Preempted | None = None
        error: str | None = None
        node_fault = False
        try:
            entry.stream = entry.pool.render(engine_request(claimed, tracing.traceparent_of(entry.span)))
            if entry.withdrawn:
                entry.stream.cancel()
            async for batch in entry.stream:
                for event in batch:
                    match event:
                        case RenderProgress():
                            self._on_progress(entry, event)
                        case Done():
                            outcome, final = AttemptOutcome.SUCCEEDED, event
                        case Preempted():
                            outcome, final = AttemptOutcome.PREEMPTED, event
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
            if not entry.cancel_sent:
                self._node_failed(entry.node, claimed.id, f"engine lost: {lost.message}")
                return Release(f"engine lost: {lost.message}")
            outcome = AttemptOutcome.CANCELLED
        except Exception as failure:
            if entry.cancel_sent or entry.withdrawn:  # the stream ended because it was cancelled
                outcome = AttemptOutcome.CANCELLED
            else:
                outcome, error = AttemptOutcome.FAILED, f"{type(failure).__name__}: {failure}"
                node_fault = not is_the_render_at_fault(failure)
                log.warning("render %s failed on %s: %s", claimed.id, entry.node or entry.pool.key, error)
                if node_fault:
                    self._node_failed(entry.node, claimed.id, error)
        return ending_of(entry, outcome, final, error, node_fault)

    def _on_progress(self, entry: RunningAttempt, event: RenderProgress) -> None:
        claimed, pool = entry.claimed, entry.pool
        entry.node = event.node or entry.node
        if not entry.engine_started:
            # Queue wait ends when an engine starts on it, not when it was leased.
            entry.engine_started = True
            waited = (utcnow() - claimed.created_at).total_seconds() if claimed.attempt == 1 else None
            self.metrics.attempt_started(claimed, waited)
        postprocessing = event.stage in (Stage.POSTPROCESSING, Stage.WRITING)
        if postprocessing != entry.postprocessing:
            # (A quality-gate retry takes a render back into the engine.)
            entry.postprocessing = postprocessing
            if postprocessing:
                self._engine_freed.set()
                self.wake()  # its engine can start the next render
        entry.meter.record(event)
        if event.step_seconds:
            self.metrics.step_finished(claimed.spec.model, pool.device_kind, event.step_seconds)
        self.progress.add(ProgressUpdate(claimed.id, claimed.attempt, event.stage, event.step, event.total_steps,
                                         at=event.at))

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

    def _forget(self, render_id: str) -> None:
        """The attempt is over (recorded): its engine and its slot are free."""
        self.running.pop(render_id, None)
        self._publish_running()
        self._engine_freed.set()
        self._attempt_ended.set()
        self.wake()

    def _cancel(self, render_id: str) -> None:
        entry = self.running.get(render_id)
        if entry and entry.stream is not None and not entry.cancel_sent:
            entry.cancel_sent = True
            entry.stream.cancel()

    def _publish_running(self) -> None:
        for model in self.pools:
            self.metrics.running(model, self.running_count(model))

    # -- leases and cancels ------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            try:
                await self._renew_leases()
                requeued = await self._lease_call(self.store.requeue_expired, self.settings.max_attempts)
                if requeued:
                    log.warning("requeued renders whose lease expired: %s", sorted(requeued))
                    for model in requeued.values():
                        self.metrics.attempt_lost(model, "", "lease")
                    self.wake()
                pools = [PoolStatus(p.model, p.device_kind, p.slots, p.min_replicas, p.max_replicas)
                         for p in self.all_pools()]
                await asyncio.to_thread(self.store.publish_pools, self.owner, pools)
            except Exception:
                self.metrics.store_error("lease")
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
                self.metrics.store_error("cancels")
                log.exception("checking for cancels failed")
                continue
            for render_id in ids:
                self._cancel(render_id)

    # -- pool sizes --------------------------------------------------------------------

    async def _autoscale_loop(self) -> None:
        """Sizes every pool from the work queued for it: the backlog in estimated
        device-seconds (queued renders spread over the pools that may run them, each
        to where it would finish first), its target time, the busy replicas and the
        cold start of a new replica."""
        while True:
            try:
                await self._autoscale_once()
            except Exception:
                self.metrics.store_error("autoscale")
                log.exception("autoscaling failed; retrying")
            await asyncio.sleep(self.settings.autoscale_interval_s)

    async def _autoscale_once(self) -> None:
        await self._refresh_timing_models()
        for pool in self.all_pools():
            await pool.refresh()
        # Renders that cost the same are counted together (one grouped query however long
        # the queue), so each group is estimated once.
        queued = await asyncio.to_thread(self.store.queued_work, list(self.pools))
        counts = dict.fromkeys(self.pools, 0)
        by_model: dict[str, list] = {}
        for work in queued:
            spec = work.spec
            counts[spec.model] += work.count
            pools = self.pools.get(spec.model, [])
            left = 1 - work.done_steps / max(spec.num_inference_steps, 1)
            seconds_on = {p.key: self.placement.estimate_seconds(spec, p) * left
                          for p in self.placement.pools_it_fits(spec)}
            required = next((p.key for p in pools if p.device_kind == work.required), None) if work.required else None
            by_model.setdefault(spec.model, []).append((seconds_on, required, work.count))
        for model, count in counts.items():
            self.metrics.queued(model, count)
        depth = 1 + self.settings.prefetch_per_replica
        for model, pools in self.pools.items():
            backlog = assign_grouped_backlog(by_model.get(model, []), {p.key: p.max_replicas for p in pools})
            for pool in pools:
                rendering = sum(r.needs_engine for r in self.running_on(pool))
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
        await self._prune_when_due()

    async def _prune_when_due(self) -> None:
        """The store's retention (`store.event_retention_days`, `image_retention_days`):
        a prune starts every `store.prune_interval_s` and goes on a few short transactions
        per autoscaling round until done, so a large first prune never stalls the pools'
        sizing. A failure waits for the next interval."""
        retention = self.config.store
        if retention.event_retention_days is None and retention.image_retention_days is None:
            return
        now = asyncio.get_running_loop().time()
        if self._prune_at is not None and now < self._prune_at:
            return
        try:
            pruned = await asyncio.to_thread(self.store.prune, utcnow(), retention.event_retention_days,
                                             retention.image_retention_days, max_batches=PRUNE_BATCHES_PER_ROUND)
        except Exception:
            self.metrics.store_error("prune")
            log.exception("pruning old events and images failed; trying again in %.0f s", retention.prune_interval_s)
            self._prune_at = now + retention.prune_interval_s
            return
        if pruned.events or pruned.images:
            log.info("pruned %d events and %d images of renders that ended long ago", pruned.events, pruned.images)
        self._prune_at = now if pruned.more else now + retention.prune_interval_s

    async def _refresh_timing_models(self) -> None:
        now = asyncio.get_running_loop().time()
        for pool in self.all_pools():
            key = (pool.model, pool.device_kind)
            read_at = self._timing_read_at.get(key)
            if read_at is not None and now - read_at < TIMING_MODEL_TTL_S:
                continue
            stored = await asyncio.to_thread(self.store.cost_model, *key)
            self.placement.use_timing_model(*key, TimingModel.from_json(stored) if stored else None)
            self._timing_read_at[key] = now
