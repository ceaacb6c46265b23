"""What the scheduler needs of the world around it, as protocols: the engine pools it
sends renders to (and the typed stream each render comes back as), the metrics it
reports, and the fence that keeps a quarantined node's replicas from getting renders.
`farm.serve.scheduler` implements them over Ray Serve; tests implement them in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from farm.domain.engine import EngineRequest
from farm.domain.events import EngineEvent
from farm.jobs.records import ClaimedRender
from farm.metering.cost import Charge


class RenderStream(Protocol):
    """One attempt on an engine: lists of typed events (`farm.domain.events`), progress
    first, ending with a `Done` or a `Preempted`; a failure raises instead."""

    def __aiter__(self) -> AsyncIterator[list[EngineEvent]]: ...

    def cancel(self) -> None:
        """Asks the engine to stop the attempt (at its next step); the stream then raises."""


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
                        charges: list[Charge]) -> None: ...

    def attempt_absorbed(self, model: str, charges: list[Charge]) -> None: ...

    def budget_left(self, tenant: str, dollars: float, budget_dollars: float | None = None) -> None: ...

    def queued(self, model: str, count: int) -> None: ...

    def attempt_lost(self, model: str, device_kind: str, cause: str) -> None:
        """cause: one of `farm.serve.metrics.LOSS_CAUSES` (device_kind "" when unknown: a
        lease that expired was another scheduler's)."""

    def store_error(self, operation: str) -> None:
        """A call of `operation` (one of `farm.serve.metrics.STORE_OPERATIONS`) failed."""

    def running(self, model: str, count: int) -> None: ...

    def charged(self, tenant: str, model: str, charges: list[Charge]) -> None: ...

    def pool_sized(self, model: str, device_kind: str, replicas: int, wanted: int, backlog_s: float,
                   cold_start_s: float) -> None: ...

    def preempted(self, model: str, device_kind: str) -> None: ...

    def node_quarantined(self) -> None: ...


class NodeFence(Protocol):
    """Keeps a node's engine replicas from getting renders (see `farm.jobs.scheduler.quarantine`)."""

    def exclude(self, node: str, until: float) -> None:
        """Until `until` (wall-clock seconds)."""
