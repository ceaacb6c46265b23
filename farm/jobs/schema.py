"""The job store's tables (SQLAlchemy ORM). Alembic migrations in
`farm/jobs/migrations` create them; a test checks the two agree."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from farm.domain.states import RenderState


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use farm.jobs.schema.utcnow()")
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# Fields of a stored spec (ResolvedSpec.to_json) that say who asked and what the clip
# shows, not how much work it is: renders that differ only in these take the same time
# on every pool (the timing models read the size, frames, steps, guidance, memory and
# post-processing; see farm.planning.estimate.spec_work).
NOT_WORK_FIELDS = ("prompt", "negative_prompt", "seed", "labels", "idempotency_key", "priority")


def work_key(spec_json: str) -> str | None:
    """A short key shared by the specs that ask the same work: what autoscaling groups
    queued renders by, so that a queue of any length costs it one grouped query and an
    estimate per group. None for a text that is not a spec."""
    try:
        data = json.loads(spec_json)
        for field in NOT_WORK_FIELDS:
            data.pop(field, None)
        post = data.get("postprocess")
        if post and post.get("color_reference"):
            post["color_reference"] = {}  # only whether colours are matched costs anything
        shape = json.dumps(data, sort_keys=True)
    except (TypeError, ValueError, AttributeError):
        return None
    return hashlib.sha256(shape.encode()).hexdigest()[:16]


def _work_key_of_row(context) -> str | None:
    return work_key(context.get_current_parameters()["spec_json"])


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Spending limit per period ("day" or "month", UTC); None means no budget.
    budget_period: Mapped[str | None] = mapped_column(String(8), nullable=True)
    budget_nanodollars: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Renders on engines at once (the scheduler holds back the rest) and renders
    # waiting (a submit beyond it is refused); None means unlimited.
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queued: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiKey(Base):
    """Only the SHA-256 of the secret is kept: keys are 256-bit random, so a slow
    password hash would add latency to every call without adding safety."""

    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Render(Base):
    __tablename__ = "renders"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_fingerprint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(32))
    spec_json: Mapped[str] = mapped_column(Text)
    image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    priority: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(32), default="")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    artifact_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    manifest_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    cost_nanodollars: Mapped[int] = mapped_column(BigInteger, default=0)
    # The estimate held against the tenant's budget while the render is not final.
    reserved_nanodollars: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Sequence number of the render's newest event; watchers compare it to resume.
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Placement: the only device kind that may run it, and the kind it prefers.
    require_device_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    prefer_device_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # GPU memory it needs (estimated at submit): only a pool whose devices hold it claims it.
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Device kind of the pool that ran (or runs) the latest attempt.
    device_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Post-processing results: quality scores of the delivered clip, and every
    # candidate's scores when the spec asked for several (JSON).
    quality_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    candidates_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Preemption: times preempted, and the latest denoising checkpoint to resume from.
    preemptions: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0)
    # W3C traceparent of the submit's span, when tracing is on: the scheduler's and
    # engines' spans of every attempt join that trace.
    trace_parent: Mapped[str | None] = mapped_column(String(55), nullable=True)
    # `work_key(spec_json)`, filled in on insert: renders with the same key cost the same.
    work_key: Mapped[str | None] = mapped_column(String(16), nullable=True, default=_work_key_of_row)

    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        # The claim query: queued renders of some models, by priority then age.
        Index("ix_renders_claim", "state", "model", "priority", "created_at"),
        Index("ix_renders_tenant_created", "tenant_id", "created_at"),
        Index("ix_renders_lease", "state", "lease_expires_at"),
    )


# Indexes of queued renders only (partial: their size follows the queue, not the store's
# history). Queries must say `state = 'QUEUED'` as a literal for the planner to use them
# (farm.jobs.store.queue.IS_QUEUED).
QUEUED_ONLY = Render.state == RenderState.QUEUED.value
# The heads of each tenant's queue for a model, in claim order (fair share picks from them).
Index("ix_renders_queued_heads", Render.model, Render.tenant_id, Render.priority.desc(), Render.created_at,
      Render.id, postgresql_where=QUEUED_ONLY, sqlite_where=QUEUED_ONLY)
# Autoscaling's backlog: queued renders counted by the work they ask, read from the index alone.
Index("ix_renders_queued_work", Render.model, Render.work_key, Render.require_device_kind, Render.checkpoint_step,
      Render.id, postgresql_where=QUEUED_ONLY, sqlite_where=QUEUED_ONLY)
# Retention: input images of renders that ended (farm.jobs.store.retention).
HAS_IMAGE = Render.image.is_not(None)
Index("ix_renders_image_finished", Render.finished_at, postgresql_where=HAS_IMAGE, sqlite_where=HAS_IMAGE)


class Attempt(Base):
    __tablename__ = "attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    render_id: Mapped[str] = mapped_column(ForeignKey("renders.id"))
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    device_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    node: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    timings_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    __table_args__ = (UniqueConstraint("render_id", "number"),)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    render_id: Mapped[str] = mapped_column(ForeignKey("renders.id"))
    seq: Mapped[int] = mapped_column(Integer)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    state: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(32), default="")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (
        UniqueConstraint("render_id", "seq"),
        # Retention: old events of renders that ended, by state (the final one is kept) and age.
        Index("ix_events_state_time", "state", "time"),
    )


class LedgerEntry(Base):
    """One charge: a phase of an attempt on a device kind. The unique constraint is
    what makes a replayed completion unable to charge twice."""

    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    render_id: Mapped[str] = mapped_column(ForeignKey("renders.id"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    model: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(32))
    device_kind: Mapped[str] = mapped_column(String(32))
    device_seconds: Mapped[float] = mapped_column(Float)
    nanodollars: Mapped[int] = mapped_column(BigInteger)
    # False: an attempt lost to a farm fault, recorded but absorbed by the farm.
    charged: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    __table_args__ = (
        UniqueConstraint("render_id", "attempt", "phase", "device_kind"),
        Index("ix_ledger_tenant_created", "tenant_id", "created_at"),
    )


class CostModel(Base):
    """Fitted timing coefficients per (model, device kind), written by `farm calibrate`."""

    __tablename__ = "cost_models"
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    coefficients_json: Mapped[str] = mapped_column(Text)
    samples: Mapped[int] = mapped_column(Integer)
    fitted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Pool(Base):
    """What the scheduler last said about each engine pool (a model on a device kind);
    the gateway's health and ListModels read it, so the gateway never needs Ray."""

    __tablename__ = "pools"
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    replicas: Mapped[int] = mapped_column(Integer)
    # Autoscaling bounds; a pool at 0 replicas with max_replicas > 0 is still up (it cold-starts).
    min_replicas: Mapped[int] = mapped_column(Integer, default=0)
    max_replicas: Mapped[int] = mapped_column(Integer, default=0)
    scheduler: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

