"""Pools by device kind in the store (placement, preemption, retries on other nodes,
losing the database connection) and the autoscaling arithmetic; no Ray. The scheduler's
side of the same (routing, preempting, retrying) is in test_scheduler.py."""

from __future__ import annotations

import secrets

import pytest

from farm.config import (
    FarmConfig,
    ModelConfig,
    PoolConfig,
    SchedulerConfig,
    Task,
)
from farm.domain.errors import InvalidArgument
from farm.domain.spec import RenderSpec
from farm.domain.states import AttemptOutcome, RenderState
from farm.families import Family
from farm.jobs.validation import resolve_spec
from farm.jobs.scheduler.autoscale import PoolLoad, assign_backlog, wanted_replicas
from farm.jobs.records import PoolRecord, PoolStatus
from farm.jobs.schema import utcnow
from farm.metering.cost import price_timings

OWNER = "scheduler-test"
PRICES = FarmConfig(models=[]).prices


def pooled_models() -> dict[str, ModelConfig]:
    pools = [PoolConfig(device_kind="H100", num_gpus=1, min_replicas=0, max_replicas=4),
             PoolConfig(device_kind="A100", num_gpus=1, min_replicas=1, max_replicas=2)]
    return {"ltx": ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "d"}, pools=pools)}


MODELS = pooled_models()


def submit(store, tenant_id, priority=None, require="", prefer=""):
    request = RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="a lighthouse", priority=priority,
                         width=256, height=256, num_frames=17, num_inference_steps=4,
                         require_device_kind=require, prefer_device_kind=prefer)
    record, _ = store.submit(tenant_id, request, resolve_spec(request, MODELS))
    return record


@pytest.fixture
def tenant(store):
    record, _ = store.create_tenant("acme")
    return record


def test_placement_must_name_a_pool_of_the_model():
    request = RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="x", require_device_kind="L40S")
    with pytest.raises(InvalidArgument) as raised:
        resolve_spec(request, MODELS)
    assert "spec.placement.require_device_kind" in str(raised.value.violations)
    assert "H100, A100" in str(raised.value.violations)
    spec = resolve_spec(RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="x", prefer_device_kind="A100"),
                        MODELS)
    assert spec.prefer_device_kind == "A100" and spec.require_device_kind == ""


def test_pools_need_prices_and_one_pool_per_kind():
    pools = [{"device_kind": "H100", "num_gpus": 1}, {"device_kind": "H100", "num_gpus": 1}]
    with pytest.raises(ValueError, match="one pool per device kind"):
        FarmConfig(models=[{"name": "m", "family": "ltx-video", "sources": {"text-to-video": "d"}, "pools": pools}])
    with pytest.raises(ValueError, match="TPU.*no price"):
        FarmConfig(models=[{"name": "m", "family": "ltx-video", "sources": {"text-to-video": "d"},
                            "pools": [{"device_kind": "TPU"}]}])
    with pytest.raises(ValueError, match="min_replicas 3 > max_replicas 1"):
        PoolConfig(device_kind="H100", min_replicas=3, max_replicas=1)


def test_a_render_that_requires_a_kind_waits_for_that_kind(store, tenant):
    needs_h100 = submit(store, tenant.id, require="H100")
    anywhere = submit(store, tenant.id)
    claimed = store.claim({"ltx": 2}, OWNER, 30, kinds={"ltx": ["A100"]})
    assert [c.id for c in claimed] == [anywhere.id]
    assert store.get(None, needs_h100.id).state is RenderState.QUEUED
    claimed = store.claim({"ltx": 2}, OWNER, 30, kinds={"ltx": ["A100", "H100"]})
    assert [c.id for c in claimed] == [needs_h100.id]


def test_preemption_charges_the_steps_done_and_requeues_with_the_checkpoint(store, tenant):
    render = submit(store, tenant.id, priority=10)
    [claimed] = store.claim({"ltx": 1}, OWNER, 30)
    charges = price_timings(PRICES, [("DENOISING", "H100", 2.0)])
    assert store.preempt(OWNER, render.id, claimed.attempt, checkpoint_uri="file:///ckpt/step-2.pt", step=2,
                         charges=charges, device_kind="H100", node="n1")
    record = store.get(None, render.id)
    assert record.state is RenderState.QUEUED and record.attempt == 2 and record.preemptions == 1
    assert record.checkpoint_uri == "file:///ckpt/step-2.pt" and record.checkpoint_step == 2
    assert record.cost_nanodollars == sum(c.nanodollars for c in charges) > 0
    # A replayed preemption of the old attempt writes nothing.
    assert not store.preempt(OWNER, render.id, claimed.attempt, checkpoint_uri="x", step=3, charges=charges)
    [again] = store.claim({"ltx": 1}, OWNER, 30)
    assert (again.attempt, again.checkpoint_uri, again.checkpoint_step, again.preemptions) == (
        2, "file:///ckpt/step-2.pt", 2, 1)
    done = store.finish(OWNER, render.id, 2, AttemptOutcome.SUCCEEDED, charges=charges, device_kind="H100",
                        quality={"flicker": 0.1}, candidates=[{"seed": 1, "score": 0.9, "chosen": True}])
    assert done.state is RenderState.SUCCEEDED and done.quality == {"flicker": 0.1}
    assert done.candidates[0]["chosen"] and done.device_kind == "H100"
    assert store.ledger_total_nanodollars(tenant.id) == done.cost_nanodollars == 2 * charges[0].nanodollars
    # Preemptions are not losses: they do not count against max_attempts.
    assert store.get(None, render.id).error is None


def test_a_render_failing_on_three_nodes_fails_with_every_reason(store, tenant):
    render = submit(store, tenant.id)
    for number, node in enumerate(["node-a", "node-b", "node-c"], start=1):
        [claimed] = store.claim({"ltx": 1}, OWNER, 30)
        assert claimed.attempt == number
        # Each attempt is told where the earlier ones failed, so it can go elsewhere.
        assert claimed.failed_nodes == ("node-a", "node-b", "node-c")[:number - 1]
        record = store.retry_elsewhere(OWNER, render.id, claimed.attempt, error=f"CUDA error on {node}",
                                       node=node, failed_node_limit=3)
        assert record.state is (RenderState.FAILED if node == "node-c" else RenderState.QUEUED)
    assert "failed 3 times on 3 nodes" in record.error
    for node in ("node-a", "node-b", "node-c"):
        assert f"{node}: CUDA error on {node}" in record.error


def test_a_render_failing_on_the_only_node_fails_after_the_limit_of_attempts(store, tenant):
    """A farm of one node: the render that fails wherever it runs fails there every time.
    It used to be queued again for ever (the set of nodes it failed on never reached 3)."""
    render = submit(store, tenant.id)
    error = "IndexError: index 0 is out of bounds for dimension 0 with size 0"
    states, claims = [], []
    for _ in range(5):
        claimed = store.claim({"ltx": 1}, OWNER, 30)
        if not claimed:
            break
        claims += claimed
        record = store.retry_elsewhere(OWNER, render.id, claimed[0].attempt, error=error, node="host/aaaa",
                                       failed_node_limit=3)
        states.append(record.state)
    assert states == [RenderState.QUEUED, RenderState.QUEUED, RenderState.FAILED]
    # The retries were told where it failed (the router sends them elsewhere if it can).
    assert [c.failed_nodes for c in claims] == [(), ("host/aaaa",), ("host/aaaa",)]
    record = store.get(None, render.id)
    assert record.state is RenderState.FAILED and record.attempt == 3
    assert record.error == f"failed 3 times on 1 node: host/aaaa: {error} (3 times)"
    assert store.claim({"ltx": 1}, OWNER, 30) == []


def test_pools_are_published_per_kind_and_a_pool_at_zero_is_still_up(store):
    store.publish_pools(OWNER, [PoolStatus("ltx", "H100", 0, 0, 4), PoolStatus("ltx", "A100", 1, 1, 2)])
    store.publish_pools(OWNER, [PoolStatus("ltx", "H100", 2, 0, 4), PoolStatus("ltx", "A100", 1, 1, 2)])
    pools = {p.device_kind: p for p in store.pools()}
    assert pools["H100"].replicas == 2 and pools["A100"].max_replicas == 2
    now = utcnow()
    assert PoolRecord("ltx", 0, "H100", now, 0, 4).is_up(15, now)
    assert not PoolRecord("ltx", 0, "H100", now, 0, 0).is_up(15, now)


def test_best_queued_and_backlog_queries(store, tenant):
    submit(store, tenant.id, priority=20)
    submit(store, tenant.id, priority=90, require="H100")
    assert store.best_queued(["ltx", "cog"]) == {"ltx": (90, "H100", None)}
    backlog = store.queued_specs(["ltx"])
    assert [(spec.priority, required, steps) for spec, required, steps in backlog] == [(20, None, 0), (90, "H100", 0)]


@pytest.mark.postgres
def test_the_store_survives_its_database_connections_being_dropped(postgres_url):
    """What a PostgreSQL restart does to clients: every pooled connection dies.
    The next call reconnects instead of failing."""
    from farm.jobs.store import JobStore
    from tests.conftest import terminate_connections

    name = f"farm-restart-{secrets.token_hex(4)}"
    # Tagged connections, so only this store's are cut (other tests share the server).
    store = JobStore(f"{postgres_url}&application_name={name}")
    tenant, _ = store.create_tenant("acme")
    submit(store, tenant.id)
    killed = terminate_connections(name)
    assert killed >= 1
    assert len(store.claim({"ltx": 1}, OWNER, 30)) == 1
    store.close()


def test_wanted_replicas_follow_the_backlog_within_bounds():
    def load(**changes):
        values = dict(key="ltx/H100", replicas=1, busy_replicas=1, min_replicas=0, max_replicas=8,
                      backlog_seconds=0.0, backlog_target_s=60.0, cold_start_s=10.0)
        values.update(changes)
        return PoolLoad(**values)

    assert wanted_replicas(load(busy_replicas=0, replicas=2)) == 0  # idle: down to the minimum (zero)
    assert wanted_replicas(load(busy_replicas=1)) == 1  # never below the busy replicas
    assert wanted_replicas(load(backlog_seconds=120.0, replicas=3)) == 1 + 2
    assert wanted_replicas(load(backlog_seconds=1e6)) == 8  # capped
    # From zero, the cold start eats into the target: 100 s of work in 60 - 10 s needs 2.
    assert wanted_replicas(load(replicas=0, busy_replicas=0, backlog_seconds=100.0)) == 2
    assert wanted_replicas(load(replicas=0, busy_replicas=0, backlog_seconds=100.0, cold_start_s=0.0)) == 2
    assert wanted_replicas(load(replicas=0, busy_replicas=0, backlog_seconds=110.0, cold_start_s=0.0)) == 2
    assert wanted_replicas(load(replicas=0, busy_replicas=0, backlog_seconds=110.0, cold_start_s=20.0)) == 3


def test_faster_pools_take_more_of_the_backlog():
    # Each render takes 10 s on H100 and 20 s on A100; both pools may have 2 replicas.
    renders = [({"H100": 10.0, "A100": 20.0}, None) for _ in range(9)]
    assigned = assign_backlog(renders, {"H100": 2, "A100": 2})
    assert assigned["H100"] / 10 > assigned["A100"] / 20  # more renders to the faster pool
    assert assigned["H100"] / 10 + assigned["A100"] / 20 == 9
    required = assign_backlog([({"H100": 10.0, "A100": 20.0}, "A100")], {"H100": 2, "A100": 2})
    assert required == {"H100": 0.0, "A100": 20.0}


def test_priority_classes():
    settings = SchedulerConfig()
    assert [settings.priority_class(p).name for p in (0, 33, 34, 66, 67, 100)] == [
        "batch", "batch", "standard", "standard", "urgent", "urgent"]
    assert settings.class_rank(90) > settings.class_rank(50) > settings.class_rank(10)
    with pytest.raises(ValueError, match="first must start at 0"):
        SchedulerConfig(priority_classes=[{"name": "x", "min_priority": 5}])


@pytest.mark.postgres
def test_a_submit_wakes_a_listening_scheduler_at_once(postgres_url):
    """On PostgreSQL a submit is announced (NOTIFY), so a scheduler learns of an
    urgent render without waiting for its next poll."""
    import threading

    from farm.jobs.store import JobStore

    store = JobStore(postgres_url)
    tenant, _ = store.create_tenant("acme")
    woken = threading.Event()
    detector = store.change_detector(on_change=woken.set)
    try:
        assert woken.wait(5), "the listener never started"  # it says "maybe" once when it starts listening
        detector.changed()
        woken.clear()
        assert not detector.changed()
        submit(store, tenant.id, priority=90)
        assert woken.wait(5), "no notification for the submit"
        assert detector.changed() and not detector.changed()
    finally:
        detector.close()
        store.close()
