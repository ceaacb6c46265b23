"""Pools by device kind in the store (placement, preemption, retries on other nodes,
losing the database connection) and the autoscaling arithmetic; no Ray."""

from __future__ import annotations

import secrets

import pytest

from farm.config import (
    Family,
    FarmConfig,
    ModelConfig,
    PoolConfig,
    SchedulerConfig,
    Task,
)
from farm.domain.errors import InvalidArgument
from farm.domain.spec import RenderSpec
from farm.domain.states import AttemptOutcome, RenderState
from farm.jobs.validation import resolve_spec
from farm.jobs.autoscale import PoolLoad, assign_backlog, wanted_replicas
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


def test_an_engine_takes_the_next_render_while_its_last_one_is_post_processed(store):
    """A render in POSTPROCESSING or WRITING no longer needs its replica's engine: the
    pool has room for the next render, up to postprocessing_per_replica such renders
    more per replica; it is neither counted busy nor preemptible; a quality-gate retry
    takes it back into the engine."""
    import asyncio
    import dataclasses
    import datetime as dt

    from farm.jobs.scheduler import _Running
    from tests.unit.test_memory import claimed, placed, pooled_config, scheduler_for

    config = pooled_config()
    assert (config.scheduler.prefetch_per_replica, config.scheduler.postprocessing_per_replica) == (1, 2)
    scheduler, pools = scheduler_for(config, store, H100=1, A100=0)
    pool = pools["H100"]

    def dispatch(index: int) -> _Running:
        spec = placed(config, width=256, height=256, num_frames=17, priority=5)
        render = dataclasses.replace(claimed(spec), id=f"r{index}", claimed_at=utcnow() - dt.timedelta(seconds=index))
        scheduler.running[render.id] = entry = _Running(render, pool, stream=object(), engine_started=True)
        return entry

    def stage(entry: _Running, name: str) -> None:
        scheduler._on_progress(entry, pool, {"kind": "progress", "stage": name})

    first, second = dispatch(1), dispatch(2)
    assert scheduler._pool_room(pool) == 0  # rendering one, holding the next
    stage(first, "POSTPROCESSING")
    assert scheduler._pool_room(pool) == 1
    third = dispatch(3)
    stage(second, "WRITING")
    fourth = dispatch(4)
    stage(third, "POSTPROCESSING")
    # Engine room for one more, but the replica holds its most: 1 + 1 prefetched + 2 post-processing.
    assert scheduler._pool_room(pool) == 0
    stage(first, "DENOISING")  # a quality-gate retry renders a new seed
    assert not first.postprocessing and scheduler._pool_room(pool) == 0
    stage(first, "POSTPROCESSING")
    # Autoscaling sees one busy replica, not four renders' worth.
    asyncio.run(scheduler._autoscale_once())
    assert pool.asked == 1
    assert [r.claimed.id for r in scheduler.running.values() if scheduler._needs_engine(r)] == [fourth.claimed.id]
    # An urgent render preempts the one render on the engine, not those it has let go of.
    tenant, _ = store.create_tenant("acme")
    urgent = dict(width=256, height=256, num_frames=17, priority=90)
    store.submit(tenant.id, RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="x", **urgent),
                 placed(config, **urgent))
    asyncio.run(scheduler._preempt_for_waiting())
    assert pool.preempted == [fourth.claimed.id]


# A render that fails on every attempt, on a farm of one node ------------------------------

NODE = "host-1/a3f0c2d1e4b5"


class Fence:
    """The scheduler's NodeFence; the pool below honours it as Serve's EngineRouter does."""

    def __init__(self) -> None:
        self.excluded: dict[str, float] = {}

    def exclude(self, node: str, until: float) -> None:
        self.excluded[node] = until

    def closed(self, node: str) -> bool:
        import time

        return self.excluded.get(node, 0.0) > time.time()


class OneNodePool:
    """One engine replica on one node, as the scheduler sees it through Serve: a request
    waits while the node is quarantined (the router has no replica to give it); a render
    of one step fails after it started, as LTX-Video's scheduler did (IndexError); any
    other render succeeds."""

    model, device_kind, slots = "ltx", "CPU", 1
    min_replicas = max_replicas = 1
    backlog_target_s, relative_speed, preemptible, cold_start_s = 60.0, 1.0, False, 0.0
    key = "ltx/CPU"

    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return OneNodeStream(self, request)

    def preempt(self, render_id: str, attempt: int) -> None:
        pass

    async def refresh(self) -> None:
        pass

    def scale_to(self, replicas: int) -> None:
        pass


class OneNodeStream:
    def __init__(self, pool: OneNodePool, request) -> None:
        self.pool, self.request = pool, request

    def __aiter__(self):
        return self._events()

    async def _events(self):
        import asyncio
        import time

        while self.pool.fence.closed(NODE):
            await asyncio.sleep(0.01)
        yield [{"kind": "progress", "stage": "LOADING", "node": NODE, "at": time.time()}]
        if self.request.num_inference_steps == 1:
            raise IndexError("index 0 is out of bounds for dimension 0 with size 0")
        yield [{"kind": "progress", "stage": "DENOISING", "step": 1, "total_steps": 1, "step_seconds": 0.01,
                "at": time.time()}]
        yield [{"kind": "done", "timings": [["DENOISING", "CPU", 0.01]], "artifact_uri": "file:///clip.mp4",
                "manifest_uri": "file:///manifest.json", "device_kind": "CPU", "node": NODE}]

    def cancel(self) -> None:
        pass


def test_a_render_failing_on_every_attempt_on_a_one_node_farm_fails_and_holds_up_no_one(store):
    """SubmitRender{ltx, 1 step} wedged a one-node farm: each attempt failed on the only
    node, the render was queued again for ever (it never failed on 3 *different* nodes),
    and its third failure quarantined the node, so its fourth attempt, and every other
    tenant's render, waited for the quarantine (300 s) to end. Now it fails after
    `failed_node_limit` attempts, its repeated failures count once towards the node's
    quarantine, and the other tenant's renders run."""
    import asyncio
    import dataclasses

    from farm.jobs.scheduler import Scheduler
    from tests.unit.test_memory import Metrics

    config = FarmConfig(models=[ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "d"},
                                            pools=[PoolConfig(device_kind="CPU")])],
                        scheduler={"heartbeat_interval_s": 0.2, "poll_interval_s": 0.01})
    models = {"ltx": config.served_models()[0]}
    assert (config.scheduler.failed_node_limit, config.scheduler.quarantine_after_failures) == (3, 3)
    studio_a, _ = store.create_tenant("studio-a")
    studio_b, _ = store.create_tenant("studio-b")

    def submit_render(tenant_id: str, steps: int):
        request = RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="a lighthouse", width=32, height=32,
                             num_frames=9, num_inference_steps=max(steps, 2))
        # One step is refused at submit now: this one was queued before the limit existed.
        spec = dataclasses.replace(resolve_spec(request, models), num_inference_steps=steps)
        return store.submit(tenant_id, request, spec)[0]

    async def until_final(render_id: str, timeout_s: float = 60.0):
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            record = await asyncio.to_thread(store.get, None, render_id)
            if record.state.is_final:
                return record
            await asyncio.sleep(0.05)
        raise AssertionError(f"{render_id} is still {record.state.value} (attempt {record.attempt}, "
                             f"stage {record.stage.value}) after {timeout_s:.0f} s")

    async def scenario():
        fence = Fence()
        pool = OneNodePool(fence)
        scheduler = Scheduler(store, {"ltx": [pool]}, config, OWNER, Metrics(), fence=fence)
        bad = submit_render(studio_a.id, steps=1)
        beside = submit_render(studio_b.id, steps=2)
        scheduler.start()
        try:
            failed = await until_final(bad.id)
            after = submit_render(studio_b.id, steps=2)
            finished = [await until_final(beside.id), await until_final(after.id)]
        finally:
            await scheduler.stop()
        return failed, finished, pool, fence

    failed, finished, pool, fence = asyncio.run(scenario())
    assert failed.state is RenderState.FAILED and failed.attempt == 3, failed
    assert failed.error == (f"failed 3 times on 1 node: {NODE}: IndexError: index 0 is out of bounds for "
                            f"dimension 0 with size 0 (3 times)")
    assert [r.state for r in finished] == [RenderState.SUCCEEDED, RenderState.SUCCEEDED]
    assert fence.excluded == {}  # one render's failures did not close the farm's only node
    # Each retry was told where it had failed; with no other node it ran there at once.
    tried = [(r.attempt, r.avoid_nodes) for r in pool.requests if r.render_id == failed.id]
    assert tried == [(1, ()), (2, (NODE,)), (3, (NODE,))]
