"""Tenants: who may submit and how much. Tenants and their API keys, authentication,
limits on queued and running renders, budgets per day or month (checked at submit
against what was spent and what queued renders reserve), and usage read from the ledger."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from farm.domain.errors import AlreadyExists, NotFound, QuotaViolation, ResourceExhausted, Unauthenticated, invalid
from farm.domain.states import RenderState
from farm.jobs import schema as t
from farm.jobs.records import BudgetStatus, TenantRecord, UsageRow
from farm.jobs.store.db import Database

KEY_PREFIX = "farm"
BUDGET_PERIODS = ("day", "month")
PERIOD_ADJECTIVES = {"day": "daily", "month": "monthly"}
MAX_BUDGET_DOLLARS = 10_000_000
USAGE_GROUPS = ("model", "device", "day", "phase")
# What a client refused for a full queue is told to wait before retrying.
QUEUE_FULL_RETRY_S = 10.0


class TenantsStore:
    """The store's tenants, keys, limits, budgets and usage."""

    _db: Database

    def create_tenant(self, name: str, weight: float = 1.0) -> tuple[TenantRecord, str]:
        """Creates a tenant and its first key; the key is returned once and never stored."""
        if not name or len(name) > 64:
            raise invalid("name", "tenant names are 1..64 characters")
        tenant = t.Tenant(id=secrets.token_hex(8), name=name, weight=weight)
        try:
            with self._db.write() as session:
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
        with self._db.read() as session:
            row = session.scalar(select(t.Tenant).where(t.Tenant.name == name))
            return _tenant_record(row) if row else None

    def tenant(self, name: str) -> TenantRecord:
        record = self.tenant_by_name(name)
        if record is None:
            raise NotFound(f"tenant {name!r} not found")
        return record

    def list_tenants(self) -> list[TenantRecord]:
        with self._db.read() as session:
            keys: dict[str, list[str]] = {}
            for key in session.scalars(select(t.ApiKey).where(t.ApiKey.revoked_at.is_(None))):
                keys.setdefault(key.tenant_id, []).append(key.key_id)
            return [_tenant_record(row, tuple(keys.get(row.id, ())))
                    for row in session.scalars(select(t.Tenant).order_by(t.Tenant.name))]

    def rotate_key(self, name: str) -> str:
        """Issues a new key and revokes every older one in the same transaction."""
        with self._db.write() as session:
            tenant = self._tenant_row(session, name)
            session.execute(update(t.ApiKey).where(t.ApiKey.tenant_id == tenant.id, t.ApiKey.revoked_at.is_(None))
                            .values(revoked_at=t.utcnow()))
            return self._issue_key(session, tenant.id)

    def revoke_key(self, key_id: str) -> None:
        """Revokes one key; the next request with it is UNAUTHENTICATED."""
        if len(key_id) != 12:
            raise invalid("key_id", "is the 12 hex characters after `farm_` in a key (see `farm tenants list`)")
        with self._db.write() as session:
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
        with self._db.write() as session:
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
        with self._db.write() as session:
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
        row = session.scalar(self._db.lock(select(t.Tenant).where(t.Tenant.name == name)))
        if row is None:
            raise NotFound(f"tenant {name!r} not found")
        return row

    def budget_status(self, tenant_id: str) -> BudgetStatus | None:
        with self._db.read() as session:
            tenant = session.get(t.Tenant, tenant_id)
            return _budget_status(session, tenant) if tenant else None

    def usage(self, tenant_id: str, since: dt.datetime, until: dt.datetime, by: str) -> list[UsageRow]:
        """Charged ledger rows of a tenant in [since, until), grouped."""
        if by not in USAGE_GROUPS:
            raise invalid("by", f"{by!r} is not one of {', '.join(USAGE_GROUPS)}")
        if until <= since:
            raise invalid("until", f"{until.isoformat()} is not after since ({since.isoformat()})")
        with self._db.read() as session:
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
        with self._db.read() as session:
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

    def ledger_total_nanodollars(self, tenant_id: str | None = None, charged: bool = True) -> int:
        stmt = select(func.coalesce(func.sum(t.LedgerEntry.nanodollars), 0)).where(
            t.LedgerEntry.charged.is_(charged))
        if tenant_id:
            stmt = stmt.where(t.LedgerEntry.tenant_id == tenant_id)
        with self._db.read() as session:
            return int(session.scalar(stmt))


def _budget_status(session: Session, tenant: t.Tenant) -> BudgetStatus | None:
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


def check_limits(session: Session, tenant: t.Tenant, estimate_nanodollars: int) -> None:
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
    status = _budget_status(session, tenant)
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


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_api_key(key: str) -> tuple[str, str]:
    """`farm_<key id>_<secret>` -> (key id, secret); Unauthenticated if malformed."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12 or len(parts[2]) < 32:
        raise Unauthenticated("malformed API key: expected farm_<12 hex>_<secret>")
    return parts[1], parts[2]


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


def _tenant_record(row: t.Tenant, key_ids: tuple[str, ...] = ()) -> TenantRecord:
    return TenantRecord(row.id, row.name, row.weight, row.budget_period, row.budget_nanodollars, row.max_running,
                        row.max_queued, key_ids)
