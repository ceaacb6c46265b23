"""Leases: how the scheduler takes queued renders (claims in fair-share order, one
claim at a time) and keeps them (heartbeats that extend a lease and report cancels,
progress written only by the attempt that holds the lease)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.orm import Session

from farm.domain.spec import ResolvedSpec
from farm.domain.states import AttemptOutcome, RenderState, Stage, check_transition
from farm.jobs import schema as t
from farm.jobs.fairshare import pick_fair
from farm.jobs.records import ClaimedRender, LeaseStatus, ProgressUpdate
from farm.jobs.store.queue import queued_heads
from farm.jobs.store.rows import RenderRows

# Arbitrary constant: the PostgreSQL advisory lock that serializes claims.
CLAIM_LOCK = 7_405_112_002


class LeasesStore(RenderRows):
    """The scheduler's leases on running renders."""

    def claim(self, free_slots: dict[str, int], owner: str, lease_seconds: float,
              kinds: dict[str, Iterable[str]] | None = None,
              memory: dict[str, int | None] | None = None) -> list[ClaimedRender]:
        """Leases up to free_slots[model] queued renders of each model: higher
        priority first, then by weighted fair share between tenants, then oldest.
        With `kinds[model]` (the device kinds that have room), a render that requires
        another kind stays queued; with `memory[model]` (the most GPU memory of a pool
        with room, None for no limit), so does a render that needs more."""
        claimed: list[ClaimedRender] = []
        now = t.utcnow()
        with self._db.write() as session:
            if not self._db.is_sqlite:
                # Fair share needs one consistent view of the queue: claims run one at a
                # time (SQLite's write lock does this by itself); each is a few short queries.
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK})
            tenants = {row.id: row for row in session.scalars(select(t.Tenant))}
            running = dict(session.execute(
                select(t.Render.tenant_id, func.count()).where(t.Render.state == RenderState.RUNNING.value)
                .group_by(t.Render.tenant_id)).all())
            for model, slots in free_slots.items():
                if slots <= 0:
                    continue
                allowed = None if kinds is None or model not in kinds else list(kinds[model])
                most_memory = (memory or {}).get(model)
                picked = pick_fair(
                    slots, queued_heads(session, model, slots, allowed, most_memory), running,
                    {tid: row.weight for tid, row in tenants.items()},
                    {tid: row.max_running for tid, row in tenants.items()},
                )
                for candidate in picked:
                    running[candidate.tenant_id] = running.get(candidate.tenant_id, 0) + 1
                    row = session.scalar(self._db.lock(select(t.Render).where(
                        t.Render.id == candidate.render_id, t.Render.state == RenderState.QUEUED.value)))
                    if row is None:  # cancelled since the heads were read
                        continue
                    check_transition(RenderState(row.state), RenderState.RUNNING)
                    row.state = RenderState.RUNNING.value
                    row.stage = Stage.LOADING.value
                    row.step = row.total_steps = 0
                    row.lease_owner = owner
                    row.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
                    row.started_at = row.started_at or now
                    session.add(t.Attempt(render_id=row.id, number=row.attempt, worker=owner, started_at=now))
                    self._add_event(session, row, f"attempt {row.attempt} started")
                    claimed.append(
                        ClaimedRender(
                            id=row.id, tenant_id=row.tenant_id, tenant_name=tenants[row.tenant_id].name,
                            attempt=row.attempt, spec=ResolvedSpec.from_json(row.spec_json, row.image),
                            created_at=row.created_at, claimed_at=now, checkpoint_uri=row.checkpoint_uri,
                            checkpoint_step=row.checkpoint_step, preemptions=row.preemptions,
                            failed_nodes=self._failed_nodes(session, row) if row.attempt > 1 else (),
                            trace_parent=row.trace_parent,
                        )
                    )
        return claimed

    def record_progress(self, owner: str, updates: list[ProgressUpdate]) -> list[str]:
        """Writes a batch of progress events in one transaction. Updates from an
        attempt that no longer holds the lease are dropped. Returns the renders of the
        batch that a client asked to cancel, so the caller needs no second query."""
        if not updates:
            return []
        with self._db.write() as session:
            return self._record_progress(session, owner, updates)

    def _record_progress(self, session: Session, owner: str, updates: Sequence[ProgressUpdate]) -> list[str]:
        if not updates:
            return []
        rows = self._leased(session, owner, {u.render_id for u in updates})
        events = []
        for update_ in updates:
            row = rows.get(update_.render_id)
            if row is None or row.attempt != update_.attempt:
                continue
            row.stage = update_.stage.value
            if update_.total_steps:
                row.step, row.total_steps = update_.step, update_.total_steps
            row.event_seq += 1
            events.append({"render_id": row.id, "seq": row.event_seq, "state": row.state, "stage": row.stage,
                           "step": row.step, "total_steps": row.total_steps, "attempt": row.attempt,
                           "message": update_.message,
                           "time": dt.datetime.fromtimestamp(update_.at, dt.timezone.utc) if update_.at else t.utcnow()})
        if events:
            # One bulk insert, not an ORM object each: a render's steps are most of its rows.
            session.execute(insert(t.Event), events)
        return [rid for rid, row in rows.items() if row.cancel_requested]

    def heartbeat(self, owner: str, attempts: dict[str, int], lease_seconds: float) -> LeaseStatus:
        """Extends this owner's leases; says which renders a client asked to cancel
        and which leases are no longer this owner's (expired and requeued)."""
        if not attempts:
            return LeaseStatus(frozenset(), frozenset())
        now = t.utcnow()
        with self._db.write() as session:
            rows = self._leased(session, owner, set(attempts))
            held = {rid for rid, row in rows.items() if row.attempt == attempts[rid]}
            if held:
                session.execute(
                    update(t.Render)
                    .where(t.Render.id.in_(held))
                    .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
                )
            cancels = frozenset(rid for rid in held if rows[rid].cancel_requested)
        return LeaseStatus(cancels, frozenset(set(attempts) - held))

    def cancel_requested(self, render_ids: list[str]) -> list[str]:
        if not render_ids:
            return []
        with self._db.read() as session:
            return list(session.scalars(
                select(t.Render.id).where(t.Render.id.in_(render_ids), t.Render.cancel_requested.is_(True))
            ))

    def _leased(self, session: Session, owner: str, render_ids: set[str]) -> dict[str, t.Render]:
        stmt = select(t.Render).where(
            t.Render.id.in_(render_ids),
            t.Render.state == RenderState.RUNNING.value,
            t.Render.lease_owner == owner,
        )
        return {row.id: row for row in session.scalars(self._db.lock(stmt))}

    def _failed_nodes(self, session: Session, row: t.Render) -> tuple[str, ...]:
        """The nodes on which an engine failed the render's earlier attempts, oldest first."""
        nodes = session.scalars(
            select(t.Attempt.node).where(
                t.Attempt.render_id == row.id, t.Attempt.outcome == AttemptOutcome.RETRIED.value,
                t.Attempt.node.is_not(None))
            .order_by(t.Attempt.number))
        return tuple(dict.fromkeys(nodes))
