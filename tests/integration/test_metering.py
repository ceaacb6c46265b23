"""Metering on a real farm: budgets refused over gRPC with QuotaFailure, fair share
between tenants, usage reports, and money conserved across ledger, renders and
Prometheus after a mixed workload with cancels and a killed replica."""

from __future__ import annotations

import datetime as dt
import re
import time
import urllib.request

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from farm.client import FarmClient
from farm.domain.states import RenderState
from farm.jobs.store import JobStore
from farm.serve.flags import hold_next_render, release
from farm.v1 import render_pb2 as pb
from tests.holds import wait_held
from tests.integration.test_faults import kill_engine_replica
from tests.integration.test_render_path import small_spec


@pytest.fixture
def store(farm_config):
    config, _ = farm_config
    job_store = JobStore(config.store_url, migrate=False)
    yield job_store
    job_store.close()


def new_tenant(store, gateway, name):
    _, key = store.create_tenant(f"{name}-{time.time_ns()}")
    return FarmClient(gateway.target, key)


def test_budget_refusal_carries_quota_failure(store, gateway):
    with new_tenant(store, gateway, "thrifty") as client:
        tenant = store.authenticate(client.metadata[0][1].split()[1])
        estimate = client.estimate(small_spec())
        store.set_budget(tenant.name, estimate.dollars * 2.5, "day")
        accepted = [client.submit(small_spec(seed=i)) for i in range(2)]
        with pytest.raises(grpc.RpcError) as refused:
            client.submit(small_spec(seed=99))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(refused.value)
        failure = error_details_pb2.QuotaFailure()
        assert status.details[0].Unpack(failure)
        assert failure.violations[0].subject == f"tenant:{tenant.name}/budget:day"
        assert "left" in failure.violations[0].description
        for render in accepted:
            assert client.wait(render.id).state == pb.RENDER_STATE_SUCCEEDED


def test_a_later_tenant_is_not_starved_by_a_backlog(store, gateway, holds):
    with new_tenant(store, gateway, "backlog") as big, new_tenant(store, gateway, "urgent") as late:
        # The backlog's first render holds the engine while the later tenant submits, so
        # the pool's slots are full and the next free one is the scheduler's choice.
        hold_next_render("ltx-video-tiny", step=1)
        backlog = [big.submit(small_spec(seed=i, steps=2)).id for i in range(200)]
        held_render, _ = wait_held()
        assert held_render in backlog
        mine = late.submit(small_spec(seed=7, steps=2))
        submitted_at = mine.created_at.ToDatetime(tzinfo=dt.timezone.utc)
        release(held_render)
        final = late.wait(mine.id, timeout=300)
        assert final.state == pb.RENDER_STATE_SUCCEEDED
        started = final.started_at.ToDatetime(tzinfo=dt.timezone.utc)
        big_tenant = store.authenticate(big.metadata[0][1].split()[1])
        overtook = [r for r in store.list(big_tenant.id, page_size=1000)[0]
                    if r.started_at and submitted_at < r.started_at < started]
        # One render slot of the pool (one replica, plus the render prefetched into it).
        assert len(overtook) <= 2, f"{len(overtook)} backlog renders started before the later tenant's"
        for render_id in backlog:
            try:
                big.cancel(render_id)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def scrape_cost_total(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(value) for value in re.findall(r"^farm_cost_dollars_total\{[^}]*\} (\S+)$", text, re.M))


def test_money_is_conserved_across_ledger_renders_and_prometheus(store, gateway, farm_config, holds):
    config, _ = farm_config
    with new_tenant(store, gateway, "mixed") as client:
        done = [client.submit(small_spec(seed=i, steps=3)).id for i in range(3)]
        for render in done:
            client.wait(render, timeout=300)  # so the holds below fall on the renders meant
        hold_next_render("ltx-video-tiny", step=2)  # cancelled while held
        cancelled = client.submit(small_spec(steps=6, seed=11)).id
        for event in client.watch(cancelled, timeout=300):
            if event.stage == pb.STAGE_DENOISING and event.step == 2:
                client.cancel(cancelled)
                break
        hold_next_render("ltx-video-tiny", step=3)  # its replica killed while held
        killed = client.submit(small_spec(steps=6, seed=12)).id
        for event in client.watch(killed, timeout=300):
            if event.stage == pb.STAGE_DENOISING and event.step == 3:
                kill_engine_replica("ltx-video-tiny")
                break
        finals = {rid: client.wait(rid, timeout=300) for rid in done + [cancelled, killed]}
        assert finals[cancelled].state == pb.RENDER_STATE_CANCELLED and finals[cancelled].cost.total_dollars > 0
        assert finals[killed].state == pb.RENDER_STATE_SUCCEEDED and finals[killed].attempt == 2

        now = dt.datetime.now(dt.timezone.utc)
        since, until = Timestamp(), Timestamp()
        since.FromDatetime(now - dt.timedelta(hours=1))
        until.FromDatetime(now + dt.timedelta(minutes=1))
        report = client.stub.GetUsage(pb.GetUsageRequest(since=since, until=until,
                                                         group_by=pb.USAGE_GROUPING_PHASE),
                                      metadata=client.metadata, timeout=30)
        tenant = store.authenticate(client.metadata[0][1].split()[1])
        assert report.total_nanodollars == store.ledger_total_nanodollars(tenant.id)
        assert report.total_nanodollars == sum(round(r.cost.total_dollars * 1e9) for r in finals.values())
        assert store.ledger_total_nanodollars(tenant.id, charged=False) > 0, "the lost attempt was not recorded"

    # Farm-wide, once nothing runs: ledger == renders == the Prometheus counter.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        busy = [r for t in store.list_tenants() for r in store.list(t.id, [RenderState.QUEUED, RenderState.RUNNING],
                                                                       page_size=1000)[0]]
        if not busy:
            break
        time.sleep(0.5)
    ledger = store.ledger_total_nanodollars()
    renders = sum(r.cost_nanodollars for t in store.list_tenants() for r in store.list(t.id, page_size=1000)[0])
    assert ledger == renders
    assert scrape_cost_total(config.scheduler.metrics_port) == pytest.approx(ledger / 1e9, rel=1e-9, abs=1e-9)
