"""What the scheduler reads of the queue: whether a model has work, the best priority
waiting (for preemption), the backlog autoscaling sizes pools for, and the heads of
each tenant's queue that fair share picks from when claiming."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from farm.domain.spec import ResolvedSpec
from farm.domain.states import RenderState
from farm.jobs import schema as t
from farm.jobs.fairshare import Candidate
from farm.jobs.store.db import Database


class QueueStore:
    """The scheduler's reads of queued renders."""

    _db: Database

    def has_queued(self, models: Iterable[str]) -> bool:
        with self._db.read() as session:
            return session.scalar(
                select(t.Render.id)
                .where(t.Render.state == RenderState.QUEUED.value, t.Render.model.in_(list(models)))
                .limit(1)
            ) is not None

    def queued_counts(self, models: Iterable[str]) -> dict[str, int]:
        """Queued renders per model (each model named, 0 when none): the queue depth."""
        models = list(models)
        with self._db.read() as session:
            rows = session.execute(
                select(t.Render.model, func.count())
                .where(t.Render.state == RenderState.QUEUED.value, t.Render.model.in_(models))
                .group_by(t.Render.model)).all()
        return {model: 0 for model in models} | {model: count for model, count in rows}

    def best_queued(self, models: Iterable[str], at_least: int = 0) -> dict[str, tuple[int, str | None, int | None]]:
        """Per model, the highest priority among its queued renders, and the kind and the
        GPU memory that render needs, for models whose best is at least `at_least` (for
        preemption decisions: one grouped query, and a second only for models that qualify)."""
        best: dict[str, tuple[int, str | None, int | None]] = {}
        with self._db.read() as session:
            tops = session.execute(
                select(t.Render.model, func.max(t.Render.priority))
                .where(t.Render.state == RenderState.QUEUED.value, t.Render.model.in_(list(models)))
                .group_by(t.Render.model)).all()
            for model, priority in tops:
                if priority < at_least:
                    continue
                required, memory = session.execute(
                    select(t.Render.require_device_kind, t.Render.memory_bytes)
                    .where(t.Render.state == RenderState.QUEUED.value, t.Render.model == model,
                           t.Render.priority == priority)
                    .order_by(t.Render.created_at).limit(1)).one()
                best[model] = (priority, required, memory)
        return best

    def queued_specs(self, models: Iterable[str], limit: int = 10_000) -> list[tuple[ResolvedSpec, str | None, int]]:
        """Queued renders' specs (without images), the kind each requires and the steps
        it already did (before a preemption): the backlog autoscaling sizes pools for."""
        with self._db.read() as session:
            rows = session.execute(
                select(t.Render.spec_json, t.Render.require_device_kind, t.Render.checkpoint_step)
                .where(t.Render.state == RenderState.QUEUED.value, t.Render.model.in_(list(models)))
                .order_by(t.Render.created_at).limit(limit)).all()
        return [(ResolvedSpec.from_json(r.spec_json), r.require_device_kind, r.checkpoint_step) for r in rows]


def queued_heads(session: Session, model: str, depth: int, kinds: list[str] | None = None,
                 most_memory: int | None = None) -> dict[str, list[Candidate]]:
    """The first `depth` queued renders of each tenant with work for the model
    (that may run on one of `kinds` and need at most `most_memory`, when given)."""
    where = [t.Render.state == RenderState.QUEUED.value, t.Render.model == model]
    if kinds is not None:
        where.append(or_(t.Render.require_device_kind.is_(None), t.Render.require_device_kind.in_(kinds)))
    if most_memory is not None:
        where.append(or_(t.Render.memory_bytes.is_(None), t.Render.memory_bytes <= most_memory))
    tenants = session.scalars(select(t.Render.tenant_id).where(*where).distinct())
    heads = {}
    for tenant_id in tenants:
        rows = session.execute(
            select(t.Render.id, t.Render.priority, t.Render.created_at)
            .where(*where, t.Render.tenant_id == tenant_id)
            .order_by(t.Render.priority.desc(), t.Render.created_at, t.Render.id).limit(depth)).all()
        heads[tenant_id] = [Candidate(r.id, tenant_id, r.priority, r.created_at) for r in rows]
    return heads
