"""Plain, detached views of store rows: what the store hands to the gateway and the
scheduler, so no ORM session outlives a store call."""

from __future__ import annotations

import dataclasses
import datetime as dt

from farm.domain.spec import ResolvedSpec
from farm.domain.states import RenderState, Stage


@dataclasses.dataclass(frozen=True)
class TenantRecord:
    id: str
    name: str
    weight: float
    budget_period: str | None = None
    budget_nanodollars: int | None = None
    max_running: int | None = None
    max_queued: int | None = None
    key_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BudgetStatus:
    period: str
    period_start: dt.datetime
    budget_nanodollars: int
    spent_nanodollars: int
    reserved_nanodollars: int

    @property
    def left_nanodollars(self) -> int:
        return self.budget_nanodollars - self.spent_nanodollars - self.reserved_nanodollars


@dataclasses.dataclass(frozen=True)
class UsageRow:
    key: str
    renders: int
    device_seconds: float
    nanodollars: int


@dataclasses.dataclass(frozen=True)
class ChargeRecord:
    attempt: int
    phase: str
    device_kind: str
    device_seconds: float
    nanodollars: int


@dataclasses.dataclass(frozen=True)
class RenderRecord:
    id: str
    tenant_id: str
    spec: ResolvedSpec
    state: RenderState
    stage: Stage
    step: int
    total_steps: int
    attempt: int
    cancel_requested: bool
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    artifact_uri: str | None
    manifest_uri: str | None
    cost_nanodollars: int
    error: str | None
    event_seq: int
    charges: tuple[ChargeRecord, ...] = ()
    device_kind: str | None = None
    preemptions: int = 0
    checkpoint_uri: str | None = None
    checkpoint_step: int = 0
    quality: dict | None = None
    """Quality scores of the delivered clip (post-processing)."""
    candidates: list[dict] | None = None
    """Every candidate's seed and scores, when the spec asked for several."""


@dataclasses.dataclass(frozen=True)
class EventRecord:
    render_id: str
    seq: int
    time: dt.datetime
    state: RenderState
    stage: Stage
    step: int
    total_steps: int
    attempt: int
    message: str


@dataclasses.dataclass(frozen=True)
class ClaimedRender:
    """A render the scheduler now holds a lease on."""

    id: str
    tenant_id: str
    tenant_name: str
    attempt: int
    spec: ResolvedSpec
    created_at: dt.datetime
    claimed_at: dt.datetime
    checkpoint_uri: str | None = None
    """Where the previous attempt left its denoising state, after a preemption."""
    checkpoint_step: int = 0
    preemptions: int = 0
    failed_nodes: tuple[str, ...] = ()
    """Nodes on which an engine failed earlier attempts: the next goes elsewhere if it can."""
    trace_parent: str | None = None
    """The submit's W3C traceparent (tracing on): the attempt's spans join its trace."""


@dataclasses.dataclass(frozen=True)
class ProgressUpdate:
    """A stage change or finished step reported by an engine for one attempt."""

    render_id: str
    attempt: int
    stage: Stage
    step: int = 0
    total_steps: int = 0
    message: str = ""
    at: float | None = None
    """When it happened on the engine (epoch seconds); None means when it is written."""


@dataclasses.dataclass(frozen=True)
class LeaseStatus:
    """What the store says about leases the scheduler thinks it holds."""

    cancel_requested: frozenset[str]
    lost: frozenset[str]


@dataclasses.dataclass(frozen=True)
class PoolStatus:
    """What a scheduler reports about one engine pool (a model on a device kind)."""

    model: str
    device_kind: str
    replicas: int
    min_replicas: int
    max_replicas: int


@dataclasses.dataclass(frozen=True)
class PoolRecord:
    model: str
    replicas: int
    device_kind: str
    updated_at: dt.datetime
    min_replicas: int = 0
    max_replicas: int = 0

    def is_up(self, stale_after_s: float, now: dt.datetime) -> bool:
        """Its scheduler reported within `stale_after_s`, and it has replicas or may
        start some (a pool scaled to zero takes renders: the backlog wakes it)."""
        fresh = (now - self.updated_at).total_seconds() < stale_after_s
        return fresh and (self.replicas > 0 or self.max_replicas > 0)
