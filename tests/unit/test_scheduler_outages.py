"""The scheduler when the store cannot take an attempt's ending: a cut PostgreSQL
connection used to leave the render RUNNING for good (its lease renewed, nothing to
requeue it); now the ending is written again until the store takes it, and an ending that
cannot be written for another reason lets the lease expire, so the render is requeued."""

from __future__ import annotations

import asyncio

import sqlalchemy

from farm.config import FarmConfig, ModelConfig, PoolConfig, Task
from farm.domain.spec import RenderSpec
from farm.domain.states import RenderState
from farm.families import Family
from farm.jobs.validation import resolve_spec
from farm.jobs.scheduler import Scheduler
from tests.unit.test_scheduler import Fence, Metrics, OneNodePool, until_final

OWNER = "scheduler-outages"


def cut_connection() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError(
        "UPDATE renders SET state=...", {}, Exception("terminating connection due to administrator command"))


def farm_config(lease_seconds: float) -> FarmConfig:
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "d"},
                        pools=[PoolConfig(device_kind="CPU")])
    return FarmConfig(models=[model], scheduler={"heartbeat_interval_s": 0.1, "poll_interval_s": 0.01,
                                                 "lease_seconds": lease_seconds})


def run_one_render(store, config: FarmConfig) -> tuple:
    """Submits a 2-step render, runs the scheduler until it is final; returns it and the scheduler."""
    tenant, _ = store.create_tenant("studio")
    request = RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="a lighthouse", width=32, height=32,
                         num_frames=9, num_inference_steps=2)
    render = store.submit(tenant.id, request, resolve_spec(request, {"ltx": config.served_models()[0]}))[0]

    async def scenario():
        fence = Fence()
        scheduler = Scheduler(store, {"ltx": [OneNodePool(fence)]}, config, OWNER, Metrics(), fence=fence)
        scheduler.start()
        try:
            return await until_final(store, render.id, timeout_s=120), scheduler
        finally:
            await scheduler.stop()

    return asyncio.run(scenario())


def test_an_ending_the_store_could_not_take_is_written_once_it_can(store, monkeypatch):
    finish, tries = store.finish, []

    def finish_after_two_cuts(*args, **kwargs):
        tries.append(args[1])
        if len(tries) <= 2:
            raise cut_connection()
        return finish(*args, **kwargs)

    monkeypatch.setattr(store, "finish", finish_after_two_cuts)
    record, _ = run_one_render(store, farm_config(lease_seconds=30))
    assert record.state is RenderState.SUCCEEDED and record.attempt == 1
    assert len(tries) == 3
    assert store.ledger_total_nanodollars() == record.cost_nanodollars > 0


def test_an_ending_that_fails_otherwise_lets_the_lease_expire_and_the_render_run_again(store, monkeypatch):
    finish, tries = store.finish, []

    def finish_failing_once(*args, **kwargs):
        tries.append(args[2])  # the attempt
        if len(tries) == 1:
            raise ValueError("a bug in writing the ending")
        return finish(*args, **kwargs)

    monkeypatch.setattr(store, "finish", finish_failing_once)
    record, _ = run_one_render(store, farm_config(lease_seconds=2))
    # Attempt 1's lease was no longer renewed: it expired, and attempt 2 finished the render.
    assert record.state is RenderState.SUCCEEDED and record.attempt == 2
    assert tries == [1, 2]
