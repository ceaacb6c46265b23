"""Urgent work first: when a render of a preempting class waits and every engine it may
use is busy with lower classes, lower-class renders still waiting in those replicas'
queues are taken back (no cost), and one denoising lower-class render per waiting urgent
one checkpoints at its next step and goes back to the queue (`plan_preemptions`). Until
then an urgent render is held back from a busy replica's queue, and nothing of a lower
class is sent ahead of it (`may_dispatch`). The scheduler's loop carries the plans out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from farm.config import SchedulerConfig
from farm.jobs.scheduler.attempt import RunningAttempt
from farm.jobs.scheduler.protocols import EnginePool
from farm.planning.memory import fits

# What the store says of a model's best queued render: (priority, required device kind or
# None, memory it needs or None).
QueuedHead = tuple[int, str | None, int | None]


@dataclasses.dataclass(frozen=True)
class PreemptionPlan:
    priority: int
    """The most urgent waiting render's, that the plan makes room for."""
    withdraw: list[RunningAttempt]
    """Dispatched but not started: taken back from their replicas' queues."""
    preempt: list[RunningAttempt]
    """Denoising: asked to checkpoint at their next step."""


def plan_preemptions(settings: SchedulerConfig, pools: list[EnginePool], attempts: list[RunningAttempt],
                     queued: QueuedHead | None, capacity: Callable[[EnginePool], int | None]) -> PreemptionPlan | None:
    """What makes room for the urgent renders of one model: those claimed and not yet
    started (`attempts` are the model's), and its best `queued` one. None when none of
    them is of a preempting class."""
    waiting = [(r.claimed.spec.priority, r.claimed.spec.require_device_kind or None, r.claimed.spec.memory_bytes)
               for r in attempts if not r.engine_started and not r.withdrawn]
    if queued is not None:
        waiting.append(queued)
    urgent = [u for u in waiting if settings.priority_class(u[0]).preempts]
    if not urgent:
        return None
    priority, required, memory = max(urgent, key=lambda u: u[0])
    rank = settings.class_rank(priority)
    # Only an engine that can run it is worth freeing: of the kind it requires, holding its memory.
    eligible = [p for p in pools if not required or p.device_kind == required]
    eligible = [p for p in eligible if fits(memory, capacity(p))] or eligible
    on_eligible = [r for r in attempts if r.pool in eligible and not r.cancel_sent]
    lower = [r for r in on_eligible if settings.class_rank(r.claimed.spec.priority) < rank]
    # Held renders are not in a replica's way; dispatched ones waiting there are.
    withdraw = [r for r in lower if r.dispatched and not r.engine_started]
    engines = sum(p.slots for p in eligible)
    # Renders past the engine (post-processing) hold no engine and cannot be preempted.
    rendering = [r for r in on_eligible if r.needs_engine]
    busy = sum(1 for r in rendering if r.engine_started and not r.preempt_sent and not r.withdrawn)
    waiting_urgent = sum(1 for u in urgent if settings.class_rank(u[0]) >= rank)
    needed = waiting_urgent - (engines - busy)
    victims = sorted(
        (r for r in rendering if r in lower and r.engine_started and not r.preempt_sent and not r.withdrawn
         and r.pool.preemptible and r.claimed.preemptions < settings.max_preemptions),
        key=lambda r: (r.claimed.spec.priority, -r.claimed.claimed_at.timestamp()))
    return PreemptionPlan(priority, withdraw, victims[:max(needed, 0)])


def may_dispatch(settings: SchedulerConfig, entry: RunningAttempt, others: list[RunningAttempt]) -> bool:
    """Whether a claimed render may go to its pool now (`others`: the rest held on that
    pool). A render of a preempting class goes only when an engine there is idle: sent
    into a busy replica's queue it would wait behind a render that is not being
    preempted. Meanwhile no lower-class render is sent ahead of it."""
    rank = settings.class_rank(entry.claimed.spec.priority)
    if any(not r.engine_started and settings.class_rank(r.claimed.spec.priority) > rank for r in others):
        return False
    if not settings.priority_class(entry.claimed.spec.priority).preempts:
        return True
    # A preempted render holds its engine until it has written its checkpoint.
    dispatched = sum(1 for r in others if r.dispatched and r.needs_engine)
    return dispatched < entry.pool.slots
