"""What the scheduler reads of the queue: whether a model has work, the best priority
waiting (for preemption), the backlog autoscaling sizes pools for, and the heads of
each tenant's queue that fair share picks from when claiming.

Each read costs the same however long the queue: the ones that run every claim or
every autoscaling round walk indexes of queued renders only (`schema.QUEUED_ONLY`) and
stop early, or read counts per group of renders that ask the same work; none reads
every queued spec."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from sqlalchemy import func, literal, or_, select
from sqlalchemy.orm import Session

from farm.domain.spec import ResolvedSpec
from farm.domain.states import RenderState
from farm.jobs import schema as t
from farm.jobs.fairshare import Candidate
from farm.jobs.store.db import Database

# `state = 'QUEUED'` written out in the SQL: PostgreSQL and SQLite use an index of queued
# renders only for a query whose own condition shows it applies, which a bound
# parameter (unknown when a statement is prepared) does not.
IS_QUEUED = t.Render.state == literal(RenderState.QUEUED.value, literal_execute=True)
# A spec of each work key seen, parsed once per process (a key names what it stands for).
_WORK_SPECS: dict[str, ResolvedSpec] = {}
MAX_WORK_SPECS = 4096


@dataclasses.dataclass(frozen=True)
class QueuedWork:
    """Queued renders that cost the same on every pool: they ask the same work
    (`schema.work_key`), require the same device kind and did the same steps before a
    preemption."""

    spec: ResolvedSpec
    """One of their specs (without its image): what estimates and placement read of it
    is what they share."""
    required: str | None
    done_steps: int
    count: int


class QueueStore:
    """The scheduler's reads of queued renders."""

    _db: Database

    def has_queued(self, models: Iterable[str]) -> bool:
        with self._db.read() as session:
            # In an index's order: a plan reading the table until the first match, which the
            # planner may like when most renders are queued, could walk every ended one first.
            return session.scalar(
                select(t.Render.model).where(IS_QUEUED, t.Render.model.in_(list(models)))
                .order_by(t.Render.model, t.Render.tenant_id).limit(1)
            ) is not None

    def best_queued(self, models: Iterable[str], at_least: int = 0) -> dict[str, tuple[int, str | None, int | None]]:
        """Per model, the highest priority among its queued renders, and the kind and the
        GPU memory that render needs, for models whose best is at least `at_least` (for
        preemption decisions, at every claim: per model one look at the end of an index,
        and a second only for models that qualify)."""
        best: dict[str, tuple[int, str | None, int | None]] = {}
        with self._db.read() as session:
            for model in dict.fromkeys(models):
                # max() of one model, not grouped by model: read off the index's end.
                priority = session.scalar(select(func.max(t.Render.priority)).where(
                    t.Render.state == RenderState.QUEUED.value, t.Render.model == model))
                if priority is None or priority < at_least:
                    continue
                required, memory = session.execute(
                    select(t.Render.require_device_kind, t.Render.memory_bytes)
                    .where(t.Render.state == RenderState.QUEUED.value, t.Render.model == model,
                           t.Render.priority == priority)
                    .order_by(t.Render.created_at).limit(1)).one()
                best[model] = (priority, required, memory)
        return best

    def queued_work(self, models: Iterable[str]) -> list[QueuedWork]:
        """The backlog autoscaling sizes pools for, in one grouped query read from an
        index however long the queue: the models' queued renders counted per group that
        costs the same (see QueuedWork), in a stable order. Their counts add up to the
        queue's length."""
        models = list(models)
        with self._db.read() as session:
            groups = session.execute(
                select(t.Render.work_key, t.Render.require_device_kind, t.Render.checkpoint_step,
                       func.count().label("count"), func.min(t.Render.id).label("first"))
                .where(IS_QUEUED, t.Render.model.in_(models))
                .group_by(t.Render.model, t.Render.work_key, t.Render.require_device_kind, t.Render.checkpoint_step)
                .order_by(t.Render.model, t.Render.work_key, t.Render.require_device_kind,
                          t.Render.checkpoint_step)).all()
            specs = {g.work_key: _WORK_SPECS.get(g.work_key) for g in groups if g.work_key is not None}
            unseen = [g.first for g in groups if g.work_key is not None and specs[g.work_key] is None]
            if unseen:
                for row in session.execute(select(t.Render.work_key, t.Render.spec_json)
                                           .where(t.Render.id.in_(unseen))):
                    specs[row.work_key] = _WORK_SPECS[row.work_key] = ResolvedSpec.from_json(row.spec_json)
                if len(_WORK_SPECS) > MAX_WORK_SPECS:
                    _WORK_SPECS.clear()
            # A render without a key (one no insert of this version wrote) is a group of its own.
            alone = [] if all(g.work_key is not None for g in groups) else session.execute(
                select(t.Render.spec_json, t.Render.require_device_kind, t.Render.checkpoint_step)
                .where(IS_QUEUED, t.Render.model.in_(models), t.Render.work_key.is_(None))).all()
        work = [QueuedWork(specs[g.work_key], g.require_device_kind, g.checkpoint_step, g.count)
                for g in groups if g.work_key is not None]
        return work + [QueuedWork(ResolvedSpec.from_json(r.spec_json), r.require_device_kind, r.checkpoint_step, 1)
                       for r in alone]

    def queued_specs(self, models: Iterable[str], limit: int = 10_000) -> list[tuple[ResolvedSpec, str | None, int]]:
        """Queued renders' specs (without images), the kind each requires and the steps
        it already did (before a preemption), oldest first, one row each: for inspecting
        a queue (autoscaling reads `queued_work`)."""
        with self._db.read() as session:
            rows = session.execute(
                select(t.Render.spec_json, t.Render.require_device_kind, t.Render.checkpoint_step)
                .where(t.Render.state == RenderState.QUEUED.value, t.Render.model.in_(list(models)))
                .order_by(t.Render.created_at).limit(limit)).all()
        return [(ResolvedSpec.from_json(r.spec_json), r.require_device_kind, r.checkpoint_step) for r in rows]


def queued_heads(session: Session, model: str, depth: int, kinds: list[str] | None = None,
                 most_memory: int | None = None) -> dict[str, list[Candidate]]:
    """The first `depth` queued renders of each tenant with work for the model
    (that may run on one of `kinds` and need at most `most_memory`, when given).
    Each read walks `ix_renders_queued_heads` and stops early: the tenants with queued
    renders one index probe each, then each tenant's head in claim order."""
    where = [IS_QUEUED, t.Render.model == model]
    if kinds is not None:
        where.append(or_(t.Render.require_device_kind.is_(None), t.Render.require_device_kind.in_(kinds)))
    if most_memory is not None:
        where.append(or_(t.Render.memory_bytes.is_(None), t.Render.memory_bytes <= most_memory))
    heads = {}
    for tenant_id in _tenants_queued(session, model):
        rows = session.execute(
            select(t.Render.id, t.Render.priority, t.Render.created_at)
            .where(*where, t.Render.tenant_id == tenant_id)
            .order_by(t.Render.priority.desc(), t.Render.created_at, t.Render.id).limit(depth)).all()
        if rows:  # none when all its renders need another kind or more memory
            heads[tenant_id] = [Candidate(r.id, tenant_id, r.priority, r.created_at) for r in rows]
    return heads


def _tenants_queued(session: Session, model: str) -> list[str]:
    """The tenants with queued renders of the model, in one query that skips from each
    tenant to the next in the index (a loose index scan: SELECT DISTINCT would read
    every queued render)."""
    def first_tenant(*after):
        return (select(t.Render.tenant_id).where(IS_QUEUED, t.Render.model == model, *after)
                .order_by(t.Render.tenant_id).limit(1).scalar_subquery())

    tenants = select(first_tenant().label("tenant_id")).cte("queued_tenants", recursive=True)
    previous = tenants.alias("previous")
    tenants = tenants.union_all(select(first_tenant(t.Render.tenant_id > previous.c.tenant_id))
                                .where(previous.c.tenant_id.is_not(None)))
    return list(session.scalars(select(tenants.c.tenant_id).where(tenants.c.tenant_id.is_not(None))))
