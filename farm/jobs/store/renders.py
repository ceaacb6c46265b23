"""Renders as the gateway sees them: submit (with idempotency keys and the limits
check), get, list, cancel, and the event reads that watchers follow."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import time
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.domain.errors import AlreadyExists, FailedPrecondition, NotFound, invalid
from farm.domain.spec import RenderSpec, ResolvedSpec
from farm.domain.states import RenderState, Stage
from farm.jobs import schema as t
from farm.jobs.records import EventRecord, RenderRecord
from farm.jobs.store.rows import RenderRows
from farm.jobs.store.tenants import check_limits

MAX_PAGE_SIZE = 1000


def new_render_id() -> str:
    # Millisecond time first, so ids sort roughly by creation; 48 random bits after.
    return f"r{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


class RendersStore(RenderRows):
    """The gateway's side of renders."""

    def submit(self, tenant_id: str, request: RenderSpec, spec: ResolvedSpec,
               estimate_nanodollars: int = 0, trace_parent: str | None = None) -> tuple[RenderRecord, bool]:
        """Queues a render, reserving its estimated cost against the tenant's budget;
        returns (render, created). With an idempotency key already used by this
        tenant, returns the first render (created=False) and reserves nothing.
        trace_parent: the submit's W3C traceparent, continued by every attempt."""
        fingerprint = request.fingerprint()
        key = spec.idempotency_key or None
        if key:
            existing = self._by_idempotency_key(tenant_id, key, fingerprint)
            if existing:
                return existing, False
        render_id = new_render_id()
        try:
            with self._db.write() as session:
                tenant = session.get(t.Tenant, tenant_id)
                if tenant is None:
                    raise NotFound(f"tenant {tenant_id!r} not found")
                if tenant.max_queued is not None or tenant.budget_nanodollars is not None:
                    # Only a tenant with limits needs its submits one at a time; NO KEY UPDATE, so
                    # that the ledger rows of its finishing renders (whose foreign key takes KEY
                    # SHARE on the tenant) need not wait for them.
                    stmt = select(t.Tenant).where(t.Tenant.id == tenant_id).execution_options(populate_existing=True)
                    tenant = session.scalar(stmt if self._db.is_sqlite else stmt.with_for_update(key_share=True))
                    check_limits(session, tenant, estimate_nanodollars)
                row = t.Render(
                    id=render_id, tenant_id=tenant_id, idempotency_key=key, request_fingerprint=fingerprint,
                    model=spec.model, task=spec.task.value, spec_json=spec.to_json(), image=spec.image or None,
                    priority=spec.priority, seed=spec.seed, state=RenderState.QUEUED.value, attempt=1,
                    created_at=t.utcnow(), reserved_nanodollars=estimate_nanodollars,
                    require_device_kind=spec.require_device_kind or None,
                    prefer_device_kind=spec.prefer_device_kind or None,
                    memory_bytes=spec.memory_bytes, trace_parent=trace_parent,
                    # Set now (not at the flush): the event below reads them, and event_seq is
                    # written with the row instead of by an UPDATE after it.
                    event_seq=0, stage="", step=0, total_steps=0, cost_nanodollars=0, cancel_requested=False,
                    preemptions=0,
                )
                session.add(row)
                self._add_event(session, row, "submitted")
                session.flush([row])  # the render before its event (no relationship orders them)
                self._notify_queued(session)
        except IntegrityError:
            # A concurrent submit with the same key won the race; answer with its render.
            existing = self._by_idempotency_key(tenant_id, key, fingerprint) if key else None
            if existing is None:
                raise
            return existing, False
        return self._record(session, row, with_charges=False), True

    def _by_idempotency_key(self, tenant_id: str, key: str, fingerprint: str) -> RenderRecord | None:
        with self._db.read() as session:
            row = session.scalar(
                select(t.Render).where(t.Render.tenant_id == tenant_id, t.Render.idempotency_key == key)
            )
            if row is None:
                return None
            if row.request_fingerprint != fingerprint:
                raise AlreadyExists(
                    f"idempotency key {key!r} was already used for render {row.id} with a different spec"
                )
            return self._record(session, row)

    def get(self, tenant_id: str | None, render_id: str) -> RenderRecord:
        """A render by id. With a tenant, another tenant's render is NOT_FOUND: its
        existence is not disclosed."""
        with self._db.read() as session:
            return self._record(session, self._owned(session, tenant_id, render_id))

    def _owned(self, session: Session, tenant_id: str | None, render_id: str, lock: bool = False) -> t.Render:
        stmt = select(t.Render).where(t.Render.id == render_id)
        if tenant_id is not None:
            stmt = stmt.where(t.Render.tenant_id == tenant_id)
        row = session.scalar(self._db.lock(stmt) if lock else stmt)
        if row is None:
            raise NotFound(f"render {render_id!r} not found")
        return row

    def list(
        self,
        tenant_id: str,
        states: Iterable[RenderState] = (),
        model: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> tuple[list[RenderRecord], str]:
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise invalid("page_size", f"{page_size} is outside 1..{MAX_PAGE_SIZE}")
        page_size = page_size or 100
        stmt = select(t.Render).where(t.Render.tenant_id == tenant_id)
        states = [s.value for s in states]
        if states:
            stmt = stmt.where(t.Render.state.in_(states))
        if model:
            stmt = stmt.where(t.Render.model == model)
        if page_token:
            created_at, last_id = _decode_page_token(page_token)
            stmt = stmt.where(
                (t.Render.created_at < created_at) | ((t.Render.created_at == created_at) & (t.Render.id < last_id))
            )
        stmt = stmt.order_by(t.Render.created_at.desc(), t.Render.id.desc()).limit(page_size + 1)
        with self._db.read() as session:
            rows = list(session.scalars(stmt))
            records = [self._record(session, row, with_charges=False) for row in rows[:page_size]]
        token = _encode_page_token(rows[page_size - 1]) if len(rows) > page_size else ""
        return records, token

    def request_cancel(self, tenant_id: str, render_id: str) -> RenderRecord:
        """A queued render is cancelled at once; a running one is flagged, and the
        scheduler stops its engine at the next denoising step."""
        with self._db.write() as session:
            row = self._owned(session, tenant_id, render_id, lock=True)
            state = RenderState(row.state)
            if state.is_final:
                raise FailedPrecondition(
                    f"render {render_id} is already {state.value}; only queued or running renders can be cancelled"
                )
            if state is RenderState.QUEUED:
                self._finish_row(session, row, RenderState.CANCELLED, message="cancelled while queued")
            elif not row.cancel_requested:
                row.cancel_requested = True
                self._add_event(session, row, "cancel requested")
        return self.get(tenant_id, render_id)

    def events_after(self, render_id: str, after_seq: int, limit: int = 1000) -> list[EventRecord]:
        with self._db.read() as session:
            rows = session.scalars(
                select(t.Event)
                .where(t.Event.render_id == render_id, t.Event.seq > after_seq)
                .order_by(t.Event.seq)
                .limit(limit)
            )
            return [_event_record(e) for e in rows]

    def event_positions(self, render_ids: Iterable[str]) -> dict[str, int]:
        """Newest event sequence of each render: one cheap query for every watcher."""
        ids = list(render_ids)
        if not ids:
            return {}
        with self._db.read() as session:
            return dict(session.execute(select(t.Render.id, t.Render.event_seq).where(t.Render.id.in_(ids))).all())


def _event_record(e: t.Event) -> EventRecord:
    return EventRecord(
        render_id=e.render_id, seq=e.seq, time=e.time, state=RenderState(e.state), stage=Stage(e.stage or ""),
        step=e.step, total_steps=e.total_steps, attempt=e.attempt, message=e.message,
    )


def _encode_page_token(row: t.Render) -> str:
    return base64.urlsafe_b64encode(f"{row.created_at.isoformat()}|{row.id}".encode()).decode()


def _decode_page_token(token: str) -> tuple[dt.datetime, str]:
    try:
        created, render_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        created_at = dt.datetime.fromisoformat(created)
    except Exception:
        created_at, render_id = None, ""
    # A token of ours has an aware time and an id PostgreSQL's text can hold: anything else
    # was made by hand and would fail in the query instead.
    if created_at is None or created_at.tzinfo is None or "\x00" in render_id:
        raise invalid("page_token", "is not a token that ListRenders returned")
    return created_at, render_id

