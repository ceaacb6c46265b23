"""A render row's moves, shared by the gateway's side and the scheduler's: each change
of state writes its event, a move that frees a slot or queues the render announces it,
and `_record` is the detached view of the row that callers get."""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.domain.spec import ResolvedSpec
from farm.domain.states import RenderState, Stage, check_transition
from farm.jobs import schema as t
from farm.jobs.records import ChargeRecord, RenderRecord
from farm.jobs.store.db import Database
from farm.jobs.store.notify import announce_queued


class RenderRows:
    """Mixin of the store's parts that change or read render rows."""

    _db: Database

    def _notify_queued(self, session: Session) -> None:
        announce_queued(session, self._db.is_sqlite)

    def _back_to_queue(self, session: Session, row: t.Render, message: str) -> None:
        check_transition(RenderState(row.state), RenderState.QUEUED)
        row.state = RenderState.QUEUED.value
        row.attempt += 1
        row.stage, row.step, row.total_steps = "", 0, 0
        row.lease_owner = row.lease_expires_at = None
        self._add_event(session, row, message)
        self._notify_queued(session)

    def _finish_row(self, session: Session, row: t.Render, state: RenderState, message: str) -> None:
        check_transition(RenderState(row.state), state)
        row.state = state.value
        row.finished_at = t.utcnow()
        row.reserved_nanodollars = 0  # the ledger now holds what it really cost
        row.lease_owner = row.lease_expires_at = None
        self._add_event(session, row, message)
        self._notify_queued(session)

    def _add_event(self, session: Session, row: t.Render, message: str, at: float | None = None) -> None:
        # The render row is locked (or SQLite's write lock is held), so seq has no gaps.
        row.event_seq += 1
        # Events are written in batches: an engine's own time says when it happened.
        time_ = dt.datetime.fromtimestamp(at, dt.timezone.utc) if at is not None else t.utcnow()
        session.add(
            t.Event(
                render_id=row.id, seq=row.event_seq, time=time_, state=row.state, stage=row.stage or "",
                step=row.step, total_steps=row.total_steps, attempt=row.attempt, message=message,
            )
        )

    def _record(self, session: Session, row: t.Render, with_charges: bool = True) -> RenderRecord:
        charges: tuple[ChargeRecord, ...] = ()
        if with_charges and row.cost_nanodollars:
            charges = tuple(
                ChargeRecord(c.attempt, c.phase, c.device_kind, c.device_seconds, c.nanodollars)
                for c in session.scalars(
                    select(t.LedgerEntry).where(t.LedgerEntry.render_id == row.id, t.LedgerEntry.charged.is_(True))
                    .order_by(t.LedgerEntry.id)
                )
            )
        return RenderRecord(
            id=row.id, tenant_id=row.tenant_id, spec=ResolvedSpec.from_json(row.spec_json, row.image),
            state=RenderState(row.state), stage=Stage(row.stage or ""), step=row.step,
            total_steps=row.total_steps, attempt=row.attempt, cancel_requested=row.cancel_requested,
            created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
            artifact_uri=row.artifact_uri, manifest_uri=row.manifest_uri,
            cost_nanodollars=row.cost_nanodollars, error=row.error, event_seq=row.event_seq, charges=charges,
            device_kind=row.device_kind, preemptions=row.preemptions, checkpoint_uri=row.checkpoint_uri,
            checkpoint_step=row.checkpoint_step,
            quality=json.loads(row.quality_json) if row.quality_json else None,
            candidates=json.loads(row.candidates_json) if row.candidates_json else None,
        )
