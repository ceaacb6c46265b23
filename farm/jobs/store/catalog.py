"""The farm's catalog: the engine pools each scheduler reports (what the gateway
admits renders against), and the cost models fitted per model and device kind with the
timing samples they are fitted from."""

from __future__ import annotations

import json

from sqlalchemy import select

from farm.domain.spec import ResolvedSpec
from farm.domain.states import RenderState
from farm.jobs import schema as t
from farm.jobs.records import PoolRecord, PoolStatus
from farm.jobs.store.db import Database


class CatalogStore:
    """Pools, cost models and timing samples."""

    _db: Database

    def publish_pools(self, scheduler: str, pools: list[PoolStatus]) -> None:
        now = t.utcnow()
        with self._db.write() as session:
            for pool in pools:
                row = session.get(t.Pool, (pool.model, pool.device_kind))
                if row is None:
                    row = t.Pool(model=pool.model, device_kind=pool.device_kind)
                    session.add(row)
                row.replicas, row.min_replicas, row.max_replicas = pool.replicas, pool.min_replicas, pool.max_replicas
                row.scheduler, row.updated_at = scheduler, now

    def pools(self) -> list[PoolRecord]:
        with self._db.read() as session:
            return [PoolRecord(p.model, p.replicas, p.device_kind, p.updated_at, p.min_replicas, p.max_replicas)
                    for p in session.scalars(select(t.Pool))]

    def recent_timings(self, model: str, limit: int = 50) -> list[tuple[ResolvedSpec, list[tuple[str, str, float]]]]:
        """Specs and measured phase timings of the model's latest succeeded renders."""
        with self._db.read() as session:
            rows = session.execute(
                select(t.Render.spec_json, t.Attempt.timings_json)
                .join(t.Attempt, (t.Attempt.render_id == t.Render.id) & (t.Attempt.number == t.Render.attempt))
                .where(t.Render.model == model, t.Render.state == RenderState.SUCCEEDED.value)
                .order_by(t.Render.finished_at.desc())
                .limit(limit)
            ).all()
        return [(ResolvedSpec.from_json(spec), [tuple(x) for x in json.loads(timings)])
                for spec, timings in rows if timings]

    def save_cost_model(self, model: str, device_kind: str, coefficients: dict, samples: int) -> None:
        with self._db.write() as session:
            row = session.get(t.CostModel, (model, device_kind))
            if row is None:
                row = t.CostModel(model=model, device_kind=device_kind)
                session.add(row)
            row.coefficients_json, row.samples, row.fitted_at = json.dumps(coefficients), samples, t.utcnow()

    def cost_model(self, model: str, device_kind: str) -> dict | None:
        with self._db.read() as session:
            row = session.get(t.CostModel, (model, device_kind))
            return json.loads(row.coefficients_json) if row else None

