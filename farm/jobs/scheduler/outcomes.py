"""How an attempt ends, and writing that down: the render is finished (SUCCEEDED with
its replica's `Done`, FAILED, CANCELLED), queued again after a preemption with its
checkpoint, retried on another node after an engine failed it there, or released when
its replica was lost (its work absorbed by the farm, not charged). Every ending is
charged by `farm.metering.charging` and written in one store transaction, fenced by the
attempt's lease; it is written again while the store cannot be reached."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from farm.config import FarmConfig
from farm.domain.errors import RenderRejected
from farm.domain.events import Done, Preempted
from farm.domain.states import AttemptOutcome
from farm.jobs.outages import store_unreachable
from farm.jobs.scheduler.attempt import RunningAttempt
from farm.jobs.scheduler.progress import ProgressBuffer
from farm.jobs.scheduler.protocols import SchedulerMetrics
from farm.jobs.store import JobStore

log = logging.getLogger(__name__)
# An attempt's ending is written again after these (doubling) while the store is unreachable.
STORE_RETRY_FIRST_S = 0.2
STORE_RETRY_MAX_S = 5.0


@dataclasses.dataclass(frozen=True)
class Finish:
    """The render is final: SUCCEEDED (with the replica's `done`), FAILED or CANCELLED;
    charged for every phase `done` reports, else for the work metered before the end."""

    outcome: AttemptOutcome
    done: Done | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Requeue:
    """Preempted: queued again to resume from its checkpoint, charged for the steps done.
    `preempted` None: taken back from a replica's queue before it started (nothing to
    resume; not counted as a preemption)."""

    preempted: Preempted | None = None


@dataclasses.dataclass(frozen=True)
class RetryElsewhere:
    """An engine failed it mid-render, maybe the node's fault: queued again for another
    node, until `failed_node_limit` failed attempts fail the render."""

    error: str


@dataclasses.dataclass(frozen=True)
class Release:
    """Its replica (or node) was lost, or the scheduler stopped before it could
    checkpoint: queued again, its work absorbed by the farm."""

    reason: str
    cause: str = "replica"
    """Of `farm.serve.metrics.LOSS_CAUSES`."""


Ending = Finish | Requeue | RetryElsewhere | Release


def is_the_render_at_fault(failure: Exception) -> bool:
    """What the render asked for fails anywhere; anything else may be the node's fault."""
    return isinstance(failure, (RenderRejected, ValueError, TypeError))


def ending_of(entry: RunningAttempt, outcome: AttemptOutcome, final: Done | Preempted | None, error: str | None,
              node_fault: bool) -> Ending:
    """How an attempt whose stream ended with `outcome` ends (`final`: the stream's last event)."""
    if entry.withdrawn and outcome is not AttemptOutcome.SUCCEEDED and not entry.cancel_sent:
        if entry.handed_back and entry.engine_started:
            # Withdrawn mid-render as the scheduler stops: the farm's doing, not the tenant's.
            return Release("the scheduler stopped before the render could checkpoint", cause="stopped")
        return Requeue()
    if outcome is AttemptOutcome.PREEMPTED:
        return Requeue(final if isinstance(final, Preempted) else None)
    if outcome is AttemptOutcome.FAILED and entry.engine_started and node_fault:
        # Failing mid-render can be the node's fault: try another before giving up
        # (the store gives up after `failed_node_limit` failed attempts, wherever they ran).
        return RetryElsewhere(error or "failed")
    return Finish(outcome, final if isinstance(final, Done) else None, error)


class AttemptEndings:
    """Writes endings for the scheduler `owner`; `forget(render_id)` once an attempt is
    over (its slot is free)."""

    def __init__(self, store: JobStore, owner: str, config: FarmConfig, metrics: SchedulerMetrics,
                 progress: ProgressBuffer, forget: Callable[[str], None]):
        self.store, self.owner, self.config, self.metrics = store, owner, config, metrics
        self.settings = config.scheduler
        self.progress = progress
        self.forget = forget

    async def write(self, entry: RunningAttempt, ending: Ending) -> None:
        """Writes how the attempt ended, again and again while the store cannot be reached:
        given up, the render would stay RUNNING for good, its lease renewed by this
        scheduler with no attempt behind it. Each write is fenced by the lease, so one that
        committed before its connection died is not recorded twice; the retry then finds
        the attempt ended by this scheduler (`_committed_before`) and counts its metrics,
        which the lost answer kept from being counted."""
        delay = STORE_RETRY_FIRST_S
        entry.ending_retried = False
        while True:
            try:
                match ending:
                    case Finish():
                        await self._finish(entry, ending)
                    case Requeue():
                        await self._requeue(entry, ending)
                    case RetryElsewhere():
                        await self._retry_elsewhere(entry, ending)
                    case Release():
                        await self._release(entry, ending)
                return
            except Exception as error:
                if not store_unreachable(error):
                    # Not an outage: stop renewing its lease, so it expires and the render is requeued.
                    log.exception("render %s: its ending could not be written; its lease will expire",
                                  entry.claimed.id)
                    self.forget(entry.claimed.id)
                    return
                self.metrics.store_error("ending")
                log.warning("render %s: the store is unreachable (%s); writing its ending again in %.1f s",
                            entry.claimed.id, error.__class__.__name__, delay)
            entry.ending_retried = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, STORE_RETRY_MAX_S)

    async def _committed_before(self, entry: RunningAttempt, *outcomes: AttemptOutcome) -> bool:
        """Whether an earlier try of this ending committed (its answer lost to a cut
        connection): the attempt was ended by this scheduler with one of `outcomes`."""
        if not entry.ending_retried:
            return False
        claimed = entry.claimed
        ended = await asyncio.to_thread(self.store.attempt_outcome, self.owner, claimed.id, claimed.attempt)
        return ended in outcomes

    async def _requeue(self, entry: RunningAttempt, ending: Requeue) -> None:
        claimed, preempted = entry.claimed, ending.preempted
        cost = entry.meter.charge(self.config.prices, preempted.timings if preempted and preempted.timings else None)
        await self.progress.flush()
        recorded = await asyncio.to_thread(
            self.store.preempt, self.owner, claimed.id, claimed.attempt,
            checkpoint_uri=preempted.checkpoint_uri if preempted else None, step=preempted.step if preempted else 0,
            charges=cost.charges, device_kind=entry.pool.device_kind,
            node=(preempted.node if preempted else None) or entry.node, timings=cost.timing_rows(),
            counted=preempted is not None, checkpoint_seconds=preempted.checkpoint_seconds if preempted else None)
        if recorded or await self._committed_before(entry, AttemptOutcome.PREEMPTED):
            self.metrics.charged(claimed.tenant_name, claimed.spec.model, cost.charges)
        self.forget(claimed.id)

    async def _retry_elsewhere(self, entry: RunningAttempt, ending: RetryElsewhere) -> None:
        claimed = entry.claimed
        cost = entry.meter.charge(self.config.prices)
        await self.progress.flush()
        record = await asyncio.to_thread(
            self.store.retry_elsewhere, self.owner, claimed.id, claimed.attempt, error=ending.error, node=entry.node,
            failed_node_limit=self.settings.failed_node_limit, charges=cost.charges,
            device_kind=entry.pool.device_kind, timings=cost.timing_rows())
        self.forget(claimed.id)
        if record is None and await self._committed_before(entry, AttemptOutcome.RETRIED, AttemptOutcome.FAILED):
            record = await asyncio.to_thread(self.store.get, None, claimed.id)
        if record is None:
            return
        if record.state.is_final:
            duration = (record.finished_at - record.started_at).total_seconds() if record.started_at else None
            self.metrics.render_finished(claimed.tenant_name, claimed.spec.model, record.state.value, duration, 0,
                                         cost.charges)
            await self._publish_budget(claimed.tenant_id, claimed.tenant_name)
        else:
            self.metrics.charged(claimed.tenant_name, claimed.spec.model, cost.charges)

    async def _release(self, entry: RunningAttempt, ending: Release) -> None:
        claimed = entry.claimed
        # What the lost attempt did is recorded, as absorbed by the farm: not charged.
        absorbed = entry.meter.charge(self.config.prices).charges
        await self.progress.flush()
        released = await asyncio.to_thread(self.store.release, self.owner, claimed.id, claimed.attempt, ending.reason,
                                           self.settings.max_attempts, absorbed, entry.node, entry.pool.device_kind)
        if released or await self._committed_before(entry, AttemptOutcome.LOST):
            self.metrics.attempt_lost(claimed.spec.model, entry.pool.device_kind, ending.cause)
            self.metrics.attempt_absorbed(claimed.spec.model, absorbed)
        self.forget(claimed.id)

    async def _finish(self, entry: RunningAttempt, ending: Finish) -> None:
        claimed, done = entry.claimed, ending.done
        # Charged: every phase of a success; the work done before a cancel or failure.
        succeeded = ending.outcome is AttemptOutcome.SUCCEEDED
        cost = entry.meter.charge(self.config.prices, done.timings if succeeded and done else None)
        # Its progress not yet written goes in the same transaction, before the final
        # event (a transaction less between the engine's result and the client).
        progress = self.progress.take(claimed.id)
        try:
            record = await asyncio.to_thread(
                self.store.finish, self.owner, claimed.id, claimed.attempt, ending.outcome, charges=cost.charges,
                artifact_uri=done.artifact_uri if done else None, manifest_uri=done.manifest_uri if done else None,
                error=ending.error, device_kind=(done.device_kind if done else None) or entry.pool.device_kind,
                node=(done.node if done else None) or entry.node, timings=cost.timing_rows(),
                quality=done.quality if done else None, candidates=done.candidates if done else None,
                progress=progress,
            )
        except Exception:
            self.progress.put_back(progress)
            raise
        self.forget(claimed.id)
        if record is None and await self._committed_before(entry, ending.outcome):
            record = await asyncio.to_thread(self.store.get, None, claimed.id)
        if record is None:
            log.warning("attempt %s of %s no longer held its lease; not recorded", claimed.attempt, claimed.id)
            return
        duration = (record.finished_at - record.started_at).total_seconds() if record.started_at else None
        frames = claimed.spec.num_frames if succeeded else 0
        self.metrics.render_finished(claimed.tenant_name, claimed.spec.model, record.state.value, duration, frames,
                                     cost.charges)
        # Counted: nothing after this may fail the ending (it would be written and counted again).
        if claimed.checkpoint_uri:
            from farm.storage.artifacts import ArtifactStore

            # Final: the denoising checkpoints of its preemptions are of no more use.
            try:
                await asyncio.to_thread(ArtifactStore(self.config.artifacts_url).discard_checkpoints, claimed.id)
            except Exception as error:  # noqa: BLE001 - left behind, not lost
                log.warning("render %s: its checkpoints could not be discarded: %s", claimed.id, error)
        await self._publish_budget(claimed.tenant_id, claimed.tenant_name)

    async def _publish_budget(self, tenant_id: str, tenant_name: str) -> None:
        """Refreshes the tenant's budget gauges. After the ending is written and counted:
        a store that fails here must not make the ending be written (and counted) again."""
        try:
            status = await asyncio.to_thread(self.store.budget_status, tenant_id)
        except Exception as error:  # noqa: BLE001 - the gauge is refreshed at the tenant's next ending
            log.warning("cannot read tenant %s's budget for its gauge: %s", tenant_name, error)
            return
        if status is not None:
            self.metrics.budget_left(tenant_name, status.left_nanodollars / 1e9, status.budget_nanodollars / 1e9)
