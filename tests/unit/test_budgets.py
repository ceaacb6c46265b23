"""Tenant administration, budgets with atomic reservations, limits and usage, on
SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import datetime as dt

import pytest

from farm.config import PriceConfig, Task
from farm.domain.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from farm.domain.spec import RenderSpec
from farm.domain.states import AttemptOutcome, RenderState
from farm.jobs.validation import resolve_spec
from farm.metering.cost import price_timings
from tests.conftest import sample_models

MODELS = sample_models()
OWNER = "scheduler-test"
ESTIMATE = 1_000_000  # $0.001 per render


def submit(store, tenant_id, estimate=ESTIMATE, key=""):
    request = RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="a kite", width=256, height=256,
                         num_frames=17, num_inference_steps=4, idempotency_key=key)
    return store.submit(tenant_id, request, resolve_spec(request, MODELS), estimate)[0]


def test_fifty_concurrent_submits_against_a_budget_for_ten_accept_ten(store):
    tenant, _ = store.create_tenant("studio")
    store.set_budget("studio", 10 * ESTIMATE / 1e9, "day")

    def attempt(_):
        try:
            return submit(store, tenant.id).id
        except ResourceExhausted as refused:
            return refused

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(attempt, range(50)))
    accepted = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(accepted) == 10 and len(refused) == 40
    violation = refused[0].violations[0]
    assert violation.subject == "tenant:studio/budget:day" and "$0.000000 of $0.010000 left" in violation.description
    assert store.budget_status(tenant.id).reserved_nanodollars == 10 * ESTIMATE


def test_completion_settles_the_reservation_to_the_measured_cost(store):
    tenant, _ = store.create_tenant("studio")
    store.set_budget("studio", 1.0, "month")
    render = submit(store, tenant.id, estimate=500_000_000)
    assert store.budget_status(tenant.id).left_nanodollars == 500_000_000
    store.claim({"ltx": 1}, OWNER, 30)
    charges = price_timings(PriceConfig(), [("DENOISING", "H100", 36.0)])  # $0.03
    store.finish(OWNER, render.id, 1, AttemptOutcome.SUCCEEDED, charges=charges)
    status = store.budget_status(tenant.id)
    assert (status.spent_nanodollars, status.reserved_nanodollars) == (30_000_000, 0)
    assert status.left_nanodollars == 970_000_000


def test_cancelled_and_absorbed_work(store):
    tenant, _ = store.create_tenant("studio")
    render = submit(store, tenant.id)
    store.claim({"ltx": 1}, OWNER, 30)
    lost = price_timings(PriceConfig(), [("DENOISING", "CPU", 5.0)])
    assert store.release(OWNER, render.id, 1, "replica died", 3, absorbed=lost)
    store.claim({"ltx": 1}, OWNER, 30)
    store.request_cancel(tenant.id, render.id)
    partial = price_timings(PriceConfig(), [("DENOISING", "CPU", 1.0)])
    done = store.finish(OWNER, render.id, 2, AttemptOutcome.CANCELLED, charges=partial)
    assert done.state is RenderState.CANCELLED
    assert done.cost_nanodollars == partial[0].nanodollars == store.ledger_total_nanodollars(tenant.id)
    assert store.ledger_total_nanodollars(tenant.id, charged=False) == lost[0].nanodollars


def test_max_queued_refuses_with_retry_info(store):
    tenant, _ = store.create_tenant("batch")
    store.set_limits("batch", max_queued=2)
    submit(store, tenant.id), submit(store, tenant.id)
    with pytest.raises(ResourceExhausted) as refused:
        submit(store, tenant.id)
    assert refused.value.retry_after_s and refused.value.violations[0].subject == "tenant:batch/max_queued"
    # An idempotent replay is not a new render, so no limit applies to it.
    store.set_limits("batch", max_queued=0)
    first = submit(store, tenant.id, key="k")
    store.set_limits("batch", max_queued=1)
    assert submit(store, tenant.id, key="k").id == first.id


def test_max_running_holds_renders_in_the_queue(store):
    tenant, _ = store.create_tenant("batch")
    store.set_limits("batch", max_running=1)
    for _ in range(3):
        submit(store, tenant.id)
    assert len(store.claim({"ltx": 3}, OWNER, 30)) == 1


def test_rotate_and_revoke_keys(store):
    _, first = store.create_tenant("studio")
    second = store.rotate_key("studio")
    with pytest.raises(Unauthenticated, match="revoked"):
        store.authenticate(first)
    assert store.authenticate(second).name == "studio"
    key_id = second.split("_")[1]
    assert [t.key_ids for t in store.list_tenants() if t.name == "studio"] == [(key_id,)]
    store.revoke_key(key_id)
    with pytest.raises(Unauthenticated):
        store.authenticate(second)
    with pytest.raises(NotFound):
        store.revoke_key("000000000000")
    with pytest.raises(InvalidArgument):
        store.revoke_key("short")


@pytest.mark.parametrize("dollars,period,field", [(-5, "day", "budget"), (1e12, "day", "budget"),
                                                   (float("nan"), "day", "budget"), (10, "week", "period")])
def test_bad_budgets_are_refused(store, dollars, period, field):
    store.create_tenant("studio")
    with pytest.raises(InvalidArgument) as error:
        store.set_budget("studio", dollars, period)
    assert error.value.violations[0].field == field


def test_unknown_tenant_and_bad_limits(store):
    with pytest.raises(NotFound):
        store.set_budget("nobody", 1.0)
    store.create_tenant("studio")
    with pytest.raises(InvalidArgument):
        store.set_limits("studio", max_running=-1)
    with pytest.raises(InvalidArgument):
        store.set_limits("studio", weight=0)


def test_usage_groups_charged_rows_and_matches_the_ledger(store):
    tenant, _ = store.create_tenant("studio")
    for seconds in (10.0, 20.0):
        render = submit(store, tenant.id)
        store.claim({"ltx": 1}, OWNER, 30)
        store.finish(OWNER, render.id, 1, AttemptOutcome.SUCCEEDED,
                     charges=price_timings(PriceConfig(), [("DENOISING", "H100", seconds), ("ENCODING", "CPU", 1.0)]))
    now = dt.datetime.now(dt.timezone.utc)
    by_device = {r.key: r for r in store.usage(tenant.id, now - dt.timedelta(hours=1), now + dt.timedelta(hours=1),
                                                "device")}
    assert by_device["H100"].device_seconds == 30.0 and by_device["H100"].renders == 2
    by_day = store.usage(tenant.id, now - dt.timedelta(days=1), now + dt.timedelta(days=1), "day")
    assert sum(r.nanodollars for r in by_day) == store.ledger_total_nanodollars(tenant.id)
    assert store.usage(tenant.id, now + dt.timedelta(hours=1), now + dt.timedelta(hours=2), "model") == []
    with pytest.raises(InvalidArgument, match="not after since"):
        store.usage(tenant.id, now, now - dt.timedelta(days=1), "model")
    with pytest.raises(InvalidArgument):
        store.usage(tenant.id, now - dt.timedelta(days=1), now, "tenant")
