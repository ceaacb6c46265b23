"""The durable job store: renders, attempts and leases, events, tenants and keys,
the cost ledger. SQLite by default, PostgreSQL by URL; every method is one short
transaction, so the gateway and the scheduler can run in different processes (or pods)
against the same database."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

from sqlalchemy import create_engine, event, func, or_, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from farm.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    invalid,
)
from farm.domain.spec import RenderSpec, ResolvedSpec
from farm.domain.states import AttemptOutcome, RenderState, Stage, check_transition
from farm.jobs import doorbell
from farm.jobs import schema as t
from farm.jobs.fairshare import Candidate, pick_fair
from farm.jobs.records import (
    BudgetStatus,
    ChargeRecord,
    ClaimedRender,
    EventRecord,
    LeaseStatus,
    PoolRecord,
    PoolStatus,
    ProgressUpdate,
    RenderRecord,
    TenantRecord,
    UsageRow,
)
from farm.metering.cost import Charge

KEY_PREFIX = "farm"
MAX_PAGE_SIZE = 1000
BUDGET_PERIODS = ("day", "month")
PERIOD_ADJECTIVES = {"day": "daily", "month": "monthly"}
MAX_BUDGET_DOLLARS = 10_000_000
USAGE_GROUPS = ("model", "device", "day", "phase")
# What a client refused for a full queue is told to wait before retrying.
QUEUE_FULL_RETRY_S = 10.0
# Arbitrary constant: the PostgreSQL advisory lock that serializes claims.
CLAIM_LOCK = 7_405_112_002


def new_render_id() -> str:
    # Millisecond time first, so ids sort roughly by creation; 48 random bits after.
    return f"r{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_api_key(key: str) -> tuple[str, str]:
    """`farm_<key id>_<secret>` -> (key id, secret); Unauthenticated if malformed."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12 or len(parts[2]) < 32:
        raise Unauthenticated("malformed API key: expected farm_<12 hex>_<secret>")
    return parts[1], parts[2]


class JobStore:
    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 8):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = _make_engine(url, pool_size)
        if migrate:
            from farm.jobs.migrate import upgrade

            upgrade(self.engine)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        # On SQLite a write transaction takes the write lock at BEGIN: upgrading a read
        # lock later can fail with "database is locked" without waiting.
        self._writer = sessionmaker(self.engine.execution_options(farm_write=True), expire_on_commit=False)
        # SQLite has no NOTIFY: commits ring doorbells instead (see farm.jobs.doorbell).
        database = sqlite_database(url)
        self._bells = {channel: doorbell.Doorbell(database, channel)
                       for channel in (doorbell.QUEUE, doorbell.COMMITS)} if database else {}

    def close(self) -> None:
        for bell in self._bells.values():
            bell.close()
        self.engine.dispose()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reader() as session:
            yield session

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writer() as session, session.begin():
            yield session
        # Rung after the commit, so whoever wakes sees it.
        if self._bells:
            self._bells[doorbell.COMMITS].ring()
            if session.info.get("queued"):
                self._bells[doorbell.QUEUE].ring()

    def _lock(self, stmt):
        return stmt if self.is_sqlite else stmt.with_for_update()

    # -- tenants and keys -------------------------------------------------------------

    def create_tenant(self, name: str, weight: float = 1.0) -> tuple[TenantRecord, str]:
        """Creates a tenant and its first key; the key is returned once and never stored."""
        if not name or len(name) > 64:
            raise invalid("name", "tenant names are 1..64 characters")
        tenant = t.Tenant(id=secrets.token_hex(8), name=name, weight=weight)
        try:
            with self._write() as session:
                session.add(tenant)
                session.flush()
                key = self._issue_key(session, tenant.id)
        except IntegrityError:
            raise AlreadyExists(f"tenant {name!r} already exists") from None
        return _tenant_record(tenant), key

    def _issue_key(self, session: Session, tenant_id: str) -> str:
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        session.add(t.ApiKey(key_id=key_id, tenant_id=tenant_id, secret_sha256=_hash_secret(secret)))
        return f"{KEY_PREFIX}_{key_id}_{secret}"

    def tenant_by_name(self, name: str) -> TenantRecord | None:
        with self._read() as session:
            row = session.scalar(select(t.Tenant).where(t.Tenant.name == name))
            return _tenant_record(row) if row else None

    def tenant(self, name: str) -> TenantRecord:
        record = self.tenant_by_name(name)
        if record is None:
            raise NotFound(f"tenant {name!r} not found")
        return record

    def list_tenants(self) -> list[TenantRecord]:
        with self._read() as session:
            keys: dict[str, list[str]] = {}
            for key in session.scalars(select(t.ApiKey).where(t.ApiKey.revoked_at.is_(None))):
                keys.setdefault(key.tenant_id, []).append(key.key_id)
            return [_tenant_record(row, tuple(keys.get(row.id, ())))
                    for row in session.scalars(select(t.Tenant).order_by(t.Tenant.name))]

    def rotate_key(self, name: str) -> str:
        """Issues a new key and revokes every older one in the same transaction."""
        with self._write() as session:
            tenant = self._tenant_row(session, name)
            session.execute(update(t.ApiKey).where(t.ApiKey.tenant_id == tenant.id, t.ApiKey.revoked_at.is_(None))
                            .values(revoked_at=t.utcnow()))
            return self._issue_key(session, tenant.id)

    def revoke_key(self, key_id: str) -> None:
        """Revokes one key; the next request with it is UNAUTHENTICATED."""
        if len(key_id) != 12:
            raise invalid("key_id", "is the 12 hex characters after `farm_` in a key (see `farm tenants list`)")
        with self._write() as session:
            key = session.get(t.ApiKey, key_id)
            if key is None:
                raise NotFound(f"API key {key_id!r} not found")
            key.revoked_at = key.revoked_at or t.utcnow()

    def set_budget(self, name: str, dollars: float | None, period: str = "month") -> TenantRecord:
        """Sets (or with dollars=None removes) the tenant's spending limit per period."""
        if dollars is not None:
            if not (0 <= dollars <= MAX_BUDGET_DOLLARS) or dollars != dollars:
                raise invalid("budget", f"{dollars} is outside 0..{MAX_BUDGET_DOLLARS} dollars")
            if period not in BUDGET_PERIODS:
                raise invalid("period", f"{period!r} is not one of {', '.join(BUDGET_PERIODS)}")
        with self._write() as session:
            tenant = self._tenant_row(session, name)
            tenant.budget_period = period if dollars is not None else None
            tenant.budget_nanodollars = round(dollars * 1e9) if dollars is not None else None
        return self.tenant(name)

    def set_limits(self, name: str, *, max_running: int | None = None, max_queued: int | None = None,
                   weight: float | None = None, clear: bool = False) -> TenantRecord:
        """Sets the given limits; 0 (or clear=True) removes a limit."""
        for field, value, top in (("max_running", max_running, 100_000), ("max_queued", max_queued, 10_000_000)):
            if value is not None and not 0 <= value <= top:
                raise invalid(field, f"{value} is outside 0..{top} (0 removes the limit)")
        if weight is not None and not 0 < weight <= 1000:
            raise invalid("weight", f"{weight} is outside (0, 1000]")
        with self._write() as session:
            tenant = self._tenant_row(session, name)
            if clear:
                tenant.max_running = tenant.max_queued = None
            if max_running is not None:
                tenant.max_running = max_running or None
            if max_queued is not None:
                tenant.max_queued = max_queued or None
            if weight is not None:
                tenant.weight = weight
        return self.tenant(name)

    def _tenant_row(self, session: Session, name: str) -> t.Tenant:
        row = session.scalar(self._lock(select(t.Tenant).where(t.Tenant.name == name)))
        if row is None:
            raise NotFound(f"tenant {name!r} not found")
        return row

    def budget_status(self, tenant_id: str) -> BudgetStatus | None:
        with self._read() as session:
            tenant = session.get(t.Tenant, tenant_id)
            return self._budget_status(session, tenant) if tenant else None

    def _budget_status(self, session: Session, tenant: t.Tenant) -> BudgetStatus | None:
        if tenant.budget_nanodollars is None:
            return None
        start = period_start(tenant.budget_period or "month", t.utcnow())
        spent = session.scalar(
            select(func.coalesce(func.sum(t.LedgerEntry.nanodollars), 0)).where(
                t.LedgerEntry.tenant_id == tenant.id, t.LedgerEntry.charged.is_(True),
                t.LedgerEntry.created_at >= start))
        reserved = session.scalar(
            select(func.coalesce(func.sum(t.Render.reserved_nanodollars), 0)).where(
                t.Render.tenant_id == tenant.id,
                t.Render.state.in_([RenderState.QUEUED.value, RenderState.RUNNING.value])))
        return BudgetStatus(tenant.budget_period or "month", start, tenant.budget_nanodollars, int(spent),
                            int(reserved))

    def _check_limits(self, session: Session, tenant: t.Tenant, estimate_nanodollars: int) -> None:
        """Raises ResourceExhausted when this submit would pass a limit. Runs inside the
        submit's write transaction with the tenant row locked, so concurrent submits
        cannot each see the same money left."""
        if tenant.max_queued is not None:
            queued = session.scalar(select(func.count()).where(
                t.Render.tenant_id == tenant.id, t.Render.state == RenderState.QUEUED.value))
            if queued >= tenant.max_queued:
                raise ResourceExhausted(
                    f"tenant {tenant.name} has {queued} renders queued; its limit is {tenant.max_queued}",
                    [QuotaViolation(f"tenant:{tenant.name}/max_queued",
                                    f"{queued} of {tenant.max_queued} queued renders used; 0 left")],
                    retry_after_s=QUEUE_FULL_RETRY_S)
        status = self._budget_status(session, tenant)
        if status is not None and estimate_nanodollars > status.left_nanodollars:
            left = max(status.left_nanodollars, 0) / 1e9
            # Money comes back when the period turns over: that is when to retry.
            now = t.utcnow()
            resets_in_s = (next_period_start(status.period, now) - now).total_seconds()
            raise ResourceExhausted(
                f"tenant {tenant.name}'s {PERIOD_ADJECTIVES[status.period]} budget of "
                f"${status.budget_nanodollars / 1e9:.6f} has "
                f"${left:.6f} left; this render is estimated at ${estimate_nanodollars / 1e9:.6f}",
                [QuotaViolation(f"tenant:{tenant.name}/budget:{status.period}",
                                f"${left:.6f} of ${status.budget_nanodollars / 1e9:.6f} left "
                                f"(spent ${status.spent_nanodollars / 1e9:.6f}, reserved "
                                f"${status.reserved_nanodollars / 1e9:.6f}); needs ${estimate_nanodollars / 1e9:.6f}")],
                retry_after_s=resets_in_s)

    def usage(self, tenant_id: str, since: dt.datetime, until: dt.datetime, by: str) -> list[UsageRow]:
        """Charged ledger rows of a tenant in [since, until), grouped."""
        if by not in USAGE_GROUPS:
            raise invalid("by", f"{by!r} is not one of {', '.join(USAGE_GROUPS)}")
        if until <= since:
            raise invalid("until", f"{until.isoformat()} is not after since ({since.isoformat()})")
        with self._read() as session:
            rows = session.execute(
                select(t.LedgerEntry.render_id, t.LedgerEntry.model, t.LedgerEntry.device_kind,
                       t.LedgerEntry.phase, t.LedgerEntry.created_at, t.LedgerEntry.device_seconds,
                       t.LedgerEntry.nanodollars)
                .where(t.LedgerEntry.tenant_id == tenant_id, t.LedgerEntry.charged.is_(True),
                       t.LedgerEntry.created_at >= since, t.LedgerEntry.created_at < until)
            ).all()
        groups: dict[str, list] = {}
        for row in rows:
            created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=dt.timezone.utc)
            key = {"model": row.model, "device": row.device_kind, "phase": row.phase,
                   "day": created.date().isoformat()}[by]
            group = groups.setdefault(key, [set(), 0.0, 0])
            group[0].add(row.render_id)
            group[1] += row.device_seconds
            group[2] += row.nanodollars
        return [UsageRow(key, len(ids), seconds, money) for key, (ids, seconds, money) in sorted(groups.items())]

    def authenticate(self, api_key: str) -> TenantRecord:
        key_id, secret = parse_api_key(api_key)
        with self._read() as session:
            row = session.execute(
                select(t.ApiKey, t.Tenant).join(t.Tenant).where(t.ApiKey.key_id == key_id)
            ).first()
        # Compare even when the key id is unknown, so timing says nothing about ids.
        expected = row.ApiKey.secret_sha256 if row else "0" * 64
        if not hmac.compare_digest(expected, _hash_secret(secret)) or row is None:
            raise Unauthenticated("unknown API key")
        if row.ApiKey.revoked_at is not None:
            raise Unauthenticated("API key revoked")
        return _tenant_record(row.Tenant)

    # -- renders: the gateway's side ----------------------------------------------------

    def submit(self, tenant_id: str, request: RenderSpec, spec: ResolvedSpec,
               estimate_nanodollars: int = 0) -> tuple[RenderRecord, bool]:
        """Queues a render, reserving its estimated cost against the tenant's budget;
        returns (render, created). With an idempotency key already used by this
        tenant, returns the first render (created=False) and reserves nothing."""
        fingerprint = request.fingerprint()
        key = spec.idempotency_key or None
        if key:
            existing = self._by_idempotency_key(tenant_id, key, fingerprint)
            if existing:
                return existing, False
        render_id = new_render_id()
        try:
            with self._write() as session:
                tenant = session.scalar(self._lock(select(t.Tenant).where(t.Tenant.id == tenant_id)))
                if tenant is None:
                    raise NotFound(f"tenant {tenant_id!r} not found")
                self._check_limits(session, tenant, estimate_nanodollars)
                row = t.Render(
                    id=render_id, tenant_id=tenant_id, idempotency_key=key, request_fingerprint=fingerprint,
                    model=spec.model, task=spec.task.value, spec_json=spec.to_json(), image=spec.image or None,
                    priority=spec.priority, seed=spec.seed, state=RenderState.QUEUED.value, attempt=1,
                    created_at=t.utcnow(), reserved_nanodollars=estimate_nanodollars,
                    require_device_kind=spec.require_device_kind or None,
                    prefer_device_kind=spec.prefer_device_kind or None,
                    memory_bytes=spec.memory_bytes,
                )
                session.add(row)
                session.flush()
                self._add_event(session, row, "submitted")
                self._notify_queued(session)
        except IntegrityError:
            # A concurrent submit with the same key won the race; answer with its render.
            existing = self._by_idempotency_key(tenant_id, key, fingerprint) if key else None
            if existing is None:
                raise
            return existing, False
        return self.get(tenant_id, render_id), True

    def _by_idempotency_key(self, tenant_id: str, key: str, fingerprint: str) -> RenderRecord | None:
        with self._read() as session:
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
        with self._read() as session:
            return self._record(session, self._owned(session, tenant_id, render_id))

    def _owned(self, session: Session, tenant_id: str | None, render_id: str, lock: bool = False) -> t.Render:
        stmt = select(t.Render).where(t.Render.id == render_id)
        if tenant_id is not None:
            stmt = stmt.where(t.Render.tenant_id == tenant_id)
        row = session.scalar(self._lock(stmt) if lock else stmt)
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
        with self._read() as session:
            rows = list(session.scalars(stmt))
            records = [self._record(session, row, with_charges=False) for row in rows[:page_size]]
        token = _encode_page_token(rows[page_size - 1]) if len(rows) > page_size else ""
        return records, token

    def request_cancel(self, tenant_id: str, render_id: str) -> RenderRecord:
        """A queued render is cancelled at once; a running one is flagged, and the
        scheduler stops its engine at the next denoising step."""
        with self._write() as session:
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
        with self._read() as session:
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
        with self._read() as session:
            return dict(session.execute(select(t.Render.id, t.Render.event_seq).where(t.Render.id.in_(ids))).all())

    # -- renders: the scheduler's side ----------------------------------------------------

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
        with self._write() as session:
            if not self.is_sqlite:
                # Fair share needs one consistent view of the queue: claims run one at a
                # time (SQLite's write lock does this by itself). They take milliseconds.
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
                    slots, self._queued_heads(session, model, slots, allowed, most_memory), running,
                    {tid: row.weight for tid, row in tenants.items()},
                    {tid: row.max_running for tid, row in tenants.items()},
                )
                for candidate in picked:
                    running[candidate.tenant_id] = running.get(candidate.tenant_id, 0) + 1
                    row = session.scalar(self._lock(select(t.Render).where(
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
                        )
                    )
        return claimed

    def _queued_heads(self, session: Session, model: str, depth: int, kinds: list[str] | None = None,
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

    def change_detector(self, on_change=None, channel: str = doorbell.QUEUE) -> "ChangeDetector":
        return ChangeDetector(self.url, on_change, channel)

    def has_queued(self, models: Iterable[str]) -> bool:
        with self._read() as session:
            return session.scalar(
                select(t.Render.id)
                .where(t.Render.state == RenderState.QUEUED.value, t.Render.model.in_(list(models)))
                .limit(1)
            ) is not None

    def best_queued(self, models: Iterable[str], at_least: int = 0) -> dict[str, tuple[int, str | None, int | None]]:
        """Per model, the highest priority among its queued renders, and the kind and the
        GPU memory that render needs, for models whose best is at least `at_least` (for
        preemption decisions: one grouped query, and a second only for models that qualify)."""
        best: dict[str, tuple[int, str | None, int | None]] = {}
        with self._read() as session:
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

    def record_progress(self, owner: str, updates: list[ProgressUpdate]) -> list[str]:
        """Writes a batch of progress events in one transaction. Updates from an
        attempt that no longer holds the lease are dropped. Returns the renders of the
        batch that a client asked to cancel, so the caller needs no second query."""
        if not updates:
            return []
        with self._write() as session:
            return self._record_progress(session, owner, updates)

    def _record_progress(self, session: Session, owner: str, updates: Sequence[ProgressUpdate]) -> list[str]:
        if not updates:
            return []
        rows = self._leased(session, owner, {u.render_id for u in updates})
        for update_ in updates:
            row = rows.get(update_.render_id)
            if row is None or row.attempt != update_.attempt:
                continue
            row.stage = update_.stage.value
            if update_.total_steps:
                row.step, row.total_steps = update_.step, update_.total_steps
            self._add_event(session, row, update_.message, at=update_.at)
        return [rid for rid, row in rows.items() if row.cancel_requested]

    def heartbeat(self, owner: str, attempts: dict[str, int], lease_seconds: float) -> LeaseStatus:
        """Extends this owner's leases; says which renders a client asked to cancel
        and which leases are no longer this owner's (expired and requeued)."""
        if not attempts:
            return LeaseStatus(frozenset(), frozenset())
        now = t.utcnow()
        with self._write() as session:
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
        with self._read() as session:
            return list(session.scalars(
                select(t.Render.id).where(t.Render.id.in_(render_ids), t.Render.cancel_requested.is_(True))
            ))

    def _leased(self, session: Session, owner: str, render_ids: set[str]) -> dict[str, t.Render]:
        stmt = select(t.Render).where(
            t.Render.id.in_(render_ids),
            t.Render.state == RenderState.RUNNING.value,
            t.Render.lease_owner == owner,
        )
        return {row.id: row for row in session.scalars(self._lock(stmt))}

    def finish(
        self,
        owner: str,
        render_id: str,
        attempt: int,
        outcome: AttemptOutcome,
        *,
        charges: list[Charge] = (),
        absorbed: list[Charge] = (),
        artifact_uri: str | None = None,
        manifest_uri: str | None = None,
        error: str | None = None,
        device_kind: str | None = None,
        node: str | None = None,
        timings: list | None = None,
        quality: dict | None = None,
        candidates: list[dict] | None = None,
        progress: Sequence[ProgressUpdate] = (),
    ) -> RenderRecord | None:
        """Ends an attempt and its render in one transaction with its ledger rows, after
        `progress` (its last events not yet written: they come before the final one).
        Returns None, writing nothing, when the attempt no longer holds the lease (a
        replay, or a zombie attempt after a requeue): a render is never charged twice.
        `absorbed` are earlier work of this attempt that the farm does not charge."""
        state = {
            AttemptOutcome.SUCCEEDED: RenderState.SUCCEEDED,
            AttemptOutcome.FAILED: RenderState.FAILED,
            AttemptOutcome.CANCELLED: RenderState.CANCELLED,
        }[outcome]
        with self._write() as session:
            self._record_progress(session, owner, progress)
            row = self._charge_attempt(session, owner, render_id, attempt, outcome, error, charges, device_kind,
                                       node, timings)
            if row is None:
                return None
            row.artifact_uri, row.manifest_uri, row.error = artifact_uri, manifest_uri, error
            row.device_kind = device_kind or row.device_kind
            row.quality_json = json.dumps(quality) if quality is not None else None
            row.candidates_json = json.dumps(candidates) if candidates is not None else None
            message = {"SUCCEEDED": "succeeded", "FAILED": f"failed: {error}", "CANCELLED": "cancelled"}[state.value]
            self._finish_row(session, row, state, message=message)
        return self.get(None, render_id)

    def preempt(self, owner: str, render_id: str, attempt: int, *, checkpoint_uri: str | None, step: int,
                charges: list[Charge] = (), device_kind: str | None = None, node: str | None = None,
                timings: list | None = None, counted: bool = True, checkpoint_seconds: float | None = None) -> bool:
        """Ends an attempt that gave its engine to a higher-priority render: the steps it
        did are charged (the next attempt resumes from its checkpoint instead of redoing
        them), and the render is queued again with attempt + 1. A lease already lost
        writes nothing (False). `counted=False` for a render taken back from a replica's
        queue before it started: nothing to resume, not a preemption the client sees."""
        with self._write() as session:
            row = self._charge_attempt(session, owner, render_id, attempt, AttemptOutcome.PREEMPTED, None,
                                       charges, device_kind, node, timings)
            if row is None:
                return False
            row.preemptions += 1 if counted else 0
            if checkpoint_uri:
                row.checkpoint_uri, row.checkpoint_step = checkpoint_uri, step
            if row.cancel_requested:
                self._finish_row(session, row, RenderState.CANCELLED, message=f"cancelled (preempted at step {step})")
            else:
                written = f" (written in {checkpoint_seconds:.3f} s)" if checkpoint_seconds is not None else ""
                self._back_to_queue(session, row, f"preempted at step {step}; resumes from its checkpoint{written}")
            return True

    def retry_elsewhere(self, owner: str, render_id: str, attempt: int, *, error: str, node: str | None,
                        failed_node_limit: int, charges: list[Charge] = (), device_kind: str | None = None,
                        timings: list | None = None) -> RenderRecord | None:
        """An engine failed the attempt on `node`: the render is queued again (its next
        attempt goes to a node it has not failed on, where its pool has one: see
        `ClaimedRender.failed_nodes`), unless an engine has now failed it
        `failed_node_limit` times; then it fails with every node's reason. Failed attempts
        are counted, not nodes: a farm with fewer nodes than the limit would otherwise
        retry a render that fails wherever it runs for ever. Work done is charged like a
        failed render's."""
        with self._write() as session:
            row = self._charge_attempt(session, owner, render_id, attempt, AttemptOutcome.RETRIED, error,
                                       charges, device_kind, node, timings)
            if row is None:
                return None
            failures = session.execute(
                select(t.Attempt.node, t.Attempt.error).where(
                    t.Attempt.render_id == row.id, t.Attempt.outcome == AttemptOutcome.RETRIED.value)
                .order_by(t.Attempt.number)).all()
            if row.cancel_requested:
                self._finish_row(session, row, RenderState.CANCELLED, message="cancelled")
            elif len(failures) >= failed_node_limit:
                row.error = _failures_message(failures)
                self._finish_row(session, row, RenderState.FAILED, message=row.error)
            else:
                self._back_to_queue(session, row, f"failed on {node or 'an unknown node'} ({error}); retrying elsewhere")
        return self.get(None, render_id)

    def _failed_nodes(self, session: Session, row: t.Render) -> tuple[str, ...]:
        """The nodes on which an engine failed the render's earlier attempts, oldest first."""
        nodes = session.scalars(
            select(t.Attempt.node).where(
                t.Attempt.render_id == row.id, t.Attempt.outcome == AttemptOutcome.RETRIED.value,
                t.Attempt.node.is_not(None))
            .order_by(t.Attempt.number))
        return tuple(dict.fromkeys(nodes))

    def _charge_attempt(self, session: Session, owner: str, render_id: str, attempt: int, outcome: AttemptOutcome,
                        error: str | None, charges: list[Charge], device_kind: str | None, node: str | None,
                        timings: list | None) -> t.Render | None:
        """Ends a leased attempt, charging the work it did; None (nothing written) when
        the attempt no longer holds the lease."""
        row = self._leased(session, owner, {render_id}).get(render_id)
        if row is None or row.attempt != attempt:
            return None
        self._end_attempt(session, row, outcome, error, device_kind, node, timings)
        self._add_ledger(session, row, attempt, charges, charged=True)
        row.cost_nanodollars += sum(c.nanodollars for c in charges)
        return row

    def release(self, owner: str, render_id: str, attempt: int, reason: str, max_attempts: int,
                absorbed: list[Charge] = (), node: str | None = None, device_kind: str | None = None) -> bool:
        """Gives back a lease the farm could not honour (the replica died): the attempt
        is LOST, its work recorded as absorbed by the farm, not charged; the render is
        requeued with attempt + 1, or fails after max_attempts."""
        with self._write() as session:
            row = self._leased(session, owner, {render_id}).get(render_id)
            if row is None or row.attempt != attempt:
                return False
            self._add_ledger(session, row, attempt, absorbed, charged=False)
            self._requeue_row(session, row, reason, max_attempts, node=node, device_kind=device_kind)
            return True

    def _add_ledger(self, session: Session, row: t.Render, attempt: int, charges: Iterable[Charge],
                    charged: bool) -> None:
        for charge in charges:
            session.add(t.LedgerEntry(
                render_id=row.id, tenant_id=row.tenant_id, model=row.model, attempt=attempt, phase=charge.phase,
                device_kind=charge.device_kind, device_seconds=charge.device_seconds,
                nanodollars=charge.nanodollars, charged=charged,
            ))

    def requeue_expired(self, max_attempts: int) -> list[str]:
        """Sends renders whose lease expired back to the queue (attempt + 1), or
        fails them after max_attempts. Returns their ids."""
        now = t.utcnow()
        stmt = select(t.Render).where(
            t.Render.state == RenderState.RUNNING.value, t.Render.lease_expires_at < now
        )
        if not self.is_sqlite:
            stmt = stmt.with_for_update(skip_locked=True)
        with self._write() as session:
            rows = list(session.scalars(stmt))
            for row in rows:
                self._requeue_row(session, row, f"lease of {row.lease_owner} expired", max_attempts)
            return [row.id for row in rows]

    def _requeue_row(self, session: Session, row: t.Render, reason: str, max_attempts: int,
                     node: str | None = None, device_kind: str | None = None) -> None:
        self._end_attempt(session, row, AttemptOutcome.LOST, reason, device_kind, node, None)
        # Preemptions and retries on other nodes end attempts too; only losses count here.
        lost = session.scalar(select(func.count()).select_from(t.Attempt).where(
            t.Attempt.render_id == row.id, t.Attempt.outcome == AttemptOutcome.LOST.value))
        if row.cancel_requested:
            self._finish_row(session, row, RenderState.CANCELLED, message=f"cancelled ({reason})")
        elif lost >= max_attempts:
            row.error = f"lost {lost} times; last: {reason}"
            self._finish_row(session, row, RenderState.FAILED, message=row.error)
        else:
            self._back_to_queue(session, row, f"requeued: {reason}")

    def _notify_queued(self, session: Session) -> None:
        # Delivered at commit, to schedulers listening (see ChangeDetector).
        if self.is_sqlite:
            session.info["queued"] = True
        else:
            session.execute(text(f"NOTIFY {QUEUE_CHANNEL}"))

    def _back_to_queue(self, session: Session, row: t.Render, message: str) -> None:
        check_transition(RenderState(row.state), RenderState.QUEUED)
        row.state = RenderState.QUEUED.value
        row.attempt += 1
        row.stage, row.step, row.total_steps = "", 0, 0
        row.lease_owner = row.lease_expires_at = None
        self._add_event(session, row, message)
        self._notify_queued(session)

    def _end_attempt(self, session, row, outcome, error, device_kind, node, timings) -> None:
        attempt = session.scalar(
            select(t.Attempt).where(t.Attempt.render_id == row.id, t.Attempt.number == row.attempt)
        )
        if attempt is not None:
            attempt.outcome, attempt.ended_at, attempt.error = outcome.value, t.utcnow(), error
            attempt.device_kind, attempt.node = device_kind, node
            attempt.timings_json = json.dumps(timings) if timings is not None else None

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

    # -- pools -------------------------------------------------------------------------

    def publish_pools(self, scheduler: str, pools: list[PoolStatus]) -> None:
        now = t.utcnow()
        with self._write() as session:
            for pool in pools:
                row = session.get(t.Pool, (pool.model, pool.device_kind))
                if row is None:
                    row = t.Pool(model=pool.model, device_kind=pool.device_kind)
                    session.add(row)
                row.replicas, row.min_replicas, row.max_replicas = pool.replicas, pool.min_replicas, pool.max_replicas
                row.scheduler, row.updated_at = scheduler, now

    def pools(self) -> list[PoolRecord]:
        with self._read() as session:
            return [PoolRecord(p.model, p.replicas, p.device_kind, p.updated_at, p.min_replicas, p.max_replicas)
                    for p in session.scalars(select(t.Pool))]

    def queued_specs(self, models: Iterable[str], limit: int = 10_000) -> list[tuple[ResolvedSpec, str | None, int]]:
        """Queued renders' specs (without images), the kind each requires and the steps
        it already did (before a preemption): the backlog autoscaling sizes pools for."""
        with self._read() as session:
            rows = session.execute(
                select(t.Render.spec_json, t.Render.require_device_kind, t.Render.checkpoint_step)
                .where(t.Render.state == RenderState.QUEUED.value, t.Render.model.in_(list(models)))
                .order_by(t.Render.created_at).limit(limit)).all()
        return [(ResolvedSpec.from_json(r.spec_json), r.require_device_kind, r.checkpoint_step) for r in rows]

    def ping(self) -> None:
        with self._read() as session:
            session.execute(select(1))

    def recent_timings(self, model: str, limit: int = 50) -> list[tuple[ResolvedSpec, list[tuple[str, str, float]]]]:
        """Specs and measured phase timings of the model's latest succeeded renders."""
        with self._read() as session:
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
        with self._write() as session:
            row = session.get(t.CostModel, (model, device_kind))
            if row is None:
                row = t.CostModel(model=model, device_kind=device_kind)
                session.add(row)
            row.coefficients_json, row.samples, row.fitted_at = json.dumps(coefficients), samples, t.utcnow()

    def cost_model(self, model: str, device_kind: str) -> dict | None:
        with self._read() as session:
            row = session.get(t.CostModel, (model, device_kind))
            return json.loads(row.coefficients_json) if row else None

    # -- ledger --------------------------------------------------------------------------

    def ledger_total_nanodollars(self, tenant_id: str | None = None, charged: bool = True) -> int:
        stmt = select(func.coalesce(func.sum(t.LedgerEntry.nanodollars), 0)).where(
            t.LedgerEntry.charged.is_(charged))
        if tenant_id:
            stmt = stmt.where(t.LedgerEntry.tenant_id == tenant_id)
        with self._read() as session:
            return int(session.scalar(stmt))

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


QUEUE_CHANNEL = "farm_queue"
# Without a word from PostgreSQL for this long, the listener says "maybe" anyway (a
# notification lost with a dropped connection costs at most this much).
LISTEN_FALLBACK_S = 2.0


class ChangeDetector:
    """Tells cheaply whether renders may have been queued since the last look, so an
    idle scheduler need not query for work 50 times a second. On SQLite, `PRAGMA
    data_version` changes when another connection commits (microseconds, no table
    read), and the commit rings a doorbell (`channel`) that calls `on_change` at once.
    On PostgreSQL, every submit and requeue sends NOTIFY farm_queue, and a listening
    connection in a thread raises a flag and calls `on_change`. `pushed` says whether
    changes are announced here; if not (another process holds the doorbell, or no
    abstract sockets), the owner must poll."""

    def __init__(self, url: str, on_change=None, channel: str = doorbell.QUEUE):
        self._connection = None
        self._version: int | None = None
        self._flag = threading.Event()
        self._stop = threading.Event()
        self._on_change = on_change
        self._last_heard = time.monotonic()
        self._listener: threading.Thread | None = None
        self._bell: doorbell.DoorbellListener | None = None
        database = sqlite_database(url)
        if url.startswith("sqlite"):
            import sqlite3

            self._connection = sqlite3.connect(database or ":memory:", check_same_thread=False)
            if on_change is not None and database:
                self._bell = doorbell.DoorbellListener(database, channel, on_change)
        else:
            self._conninfo = _psycopg_conninfo(url)
            self._listener = threading.Thread(target=self._listen, name="store-listener", daemon=True)
            self._listener.start()

    @property
    def pushed(self) -> bool:
        return self._listener is not None or (self._bell is not None and self._bell.listening)

    def _listen(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {QUEUE_CHANNEL}")
                    self._heard()  # anything queued while not listening
                    while not self._stop.is_set():
                        for _ in connection.notifies(timeout=0.5, stop_after=1):
                            self._heard()
            except Exception:  # the database restarting: listen again shortly
                self._stop.wait(0.5)

    def _heard(self) -> None:
        self._last_heard = time.monotonic()
        self._flag.set()
        if self._on_change is not None:
            self._on_change()

    def changed(self) -> bool:
        if self._connection is None:
            if self._listener is None:
                return True
            stale = time.monotonic() - self._last_heard > LISTEN_FALLBACK_S
            if stale:
                self._last_heard = time.monotonic()
            heard = self._flag.is_set()
            self._flag.clear()
            return heard or stale
        version = self._connection.execute("PRAGMA data_version").fetchone()[0]
        changed, self._version = version != self._version, version
        return changed

    def close(self) -> None:
        self._stop.set()
        if self._bell is not None:
            self._bell.close()
        if self._connection is not None:
            self._connection.close()


def sqlite_database(url: str) -> str | None:
    """The database file of a SQLite URL; None for other databases and in-memory ones."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return database if database and database != ":memory:" else None


def _psycopg_conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def period_start(period: str, now: dt.datetime) -> dt.datetime:
    """Start (UTC) of the budget period holding `now`."""
    day = now.astimezone(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def next_period_start(period: str, now: dt.datetime) -> dt.datetime:
    """Start (UTC) of the budget period after the one holding `now`."""
    start = period_start(period, now)
    if period == "day":
        return start + dt.timedelta(days=1)
    return (start + dt.timedelta(days=32)).replace(day=1)


def _failures_message(failures: Sequence) -> str:
    """`failed N times on K nodes: node: reason (M times); ...` from (node, error) rows."""
    counts: dict[tuple[str, str], int] = {}
    for failure in failures:
        key = (failure.node or "unknown node", failure.error or "no reason given")
        counts[key] = counts.get(key, 0) + 1
    nodes = len({node for node, _ in counts})
    reasons = "; ".join(f"{node}: {error}" + (f" ({count} times)" if count > 1 else "")
                        for (node, error), count in counts.items())
    return (f"failed {len(failures)} {'time' if len(failures) == 1 else 'times'} on {nodes} "
            f"{'node' if nodes == 1 else 'nodes'}: {reasons}")


def _tenant_record(row: t.Tenant, key_ids: tuple[str, ...] = ()) -> TenantRecord:
    return TenantRecord(row.id, row.name, row.weight, row.budget_period, row.budget_nanodollars, row.max_running,
                        row.max_queued, key_ids)


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
        return dt.datetime.fromisoformat(created), render_id
    except Exception:
        raise invalid("page_token", "is not a token that ListRenders returned") from None


def _make_engine(url: str, pool_size: int) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_setup(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection):
            write = connection.get_execution_options().get("farm_write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
