"""PostgreSQL cut again and again under a mixed workload: every connection of the farm's
own database role is terminated (`pg_terminate_backend`, what a restart or failover does)
every few tenths of a second while clients submit, cancel and watch renders that succeed,
fail, are cancelled and are preempted. The real gateway (in this process, on loopback),
the real scheduler and store, and an engine pool that renders at once (no Ray, no model).

Afterwards every render has ended exactly once (one final event, at most one succeeded
attempt), and the ledger, the renders' costs and the cost metric agree to the nanodollar."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import grpc
import pytest

from farm.client import FarmClient
from farm.config import FarmConfig, ModelConfig, Task
from farm.domain.engine import EngineRequest, RenderCancelled
from farm.domain.events import Done, PhaseTiming, Preempted, RenderProgress
from farm.domain.states import RenderState, Stage
from farm.families import Family
from farm.jobs.scheduler import Scheduler
from farm.jobs.store import JobStore
from farm.serve.metrics import ServeMetrics
from farm.v1 import render_pb2 as pb
from tests.conftest import postgres_role, terminate_connections
from tests.gateway import serving

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]

RENDERS = 24
CUT_EVERY_S = 0.3
STEP_S = 0.02  # an engine step's pace here: the workload's length, never asserted on
WORKLOAD_TIMEOUT_S = 240


class InstantStream:
    """An attempt that renders by itself: it starts, steps, and ends Done, or Preempted when
    asked, or failed for a prompt that says so, or cancelled."""

    def __init__(self, pool: InstantPool, request: EngineRequest):
        self.pool, self.request = pool, request
        self.cancelled = False

    async def __aiter__(self):
        request, kind = self.request, self.pool.device_kind
        yield [RenderProgress(Stage.LOADING, at=time.time(), node="node-1")]
        steps = request.num_inference_steps
        for step in range(1, steps + 1):
            await asyncio.sleep(STEP_S)
            if self.cancelled:
                raise RenderCancelled([], step - 1)
            if (request.render_id, request.attempt) in self.pool.preempts:
                yield [Preempted(checkpoint_uri=f"file:///checkpoints/{request.render_id}", step=step - 1,
                                 total_steps=steps, timings=(PhaseTiming(Stage.DENOISING, kind, STEP_S * step),),
                                 checkpoint_seconds=0.001, device_kind=kind, node="node-1")]
                return
            if "fails" in request.prompt and step == 2:
                raise ValueError("the engine cannot render this prompt")
            while "held" in request.prompt and step == 2 and not self.pool.released.is_set():
                await asyncio.sleep(STEP_S)  # until the test lets it go, unless preempted or cancelled
                if self.cancelled or (request.render_id, request.attempt) in self.pool.preempts:
                    break
            if (request.render_id, request.attempt) in self.pool.preempts:
                continue  # ends Preempted at the next step boundary
            yield [RenderProgress(Stage.DENOISING, step=step, total_steps=steps, step_seconds=STEP_S, at=time.time())]
        yield [Done(artifact_uri=f"file:///clips/{request.render_id}.mp4",
                    manifest_uri=f"file:///clips/{request.render_id}.json",
                    timings=(PhaseTiming(Stage.DENOISING, kind, STEP_S * steps), PhaseTiming(Stage.ENCODING, "CPU", 0.01)),
                    device_kind=kind, node="node-1", frames=request.num_frames, seed=request.seed)]

    def cancel(self) -> None:
        self.cancelled = True


class InstantPool:
    """An `EnginePool` of two replicas whose engines render at once."""

    model, device_kind, min_replicas, max_replicas = "ltx", "H100", 2, 2
    backlog_target_s, relative_speed, preemptible, slots, cold_start_s = 60.0, 1.0, True, 2, 0.0

    def __init__(self, released: threading.Event):
        self.preempts: set[tuple[str, int]] = set()
        self.released = released  # held renders go on

    @property
    def key(self) -> str:
        return f"{self.model}/{self.device_kind}"

    def render(self, request: EngineRequest) -> InstantStream:
        return InstantStream(self, request)

    def preempt(self, render_id: str, attempt: int) -> None:
        self.preempts.add((render_id, attempt))

    async def refresh(self) -> None:
        pass

    def scale_to(self, replicas: int) -> None:
        pass


class SchedulerThread:
    """The scheduler in a thread with its own event loop, as it runs in its Serve replica."""

    def __init__(self, store: JobStore, config: FarmConfig, metrics: ServeMetrics, released: threading.Event):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> Scheduler:
            scheduler = Scheduler(store, {"ltx": [InstantPool(released)]}, config, "scheduler-chaos", metrics)
            scheduler.start()
            return scheduler

        self.scheduler = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.scheduler.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def spec(index: int) -> pb.RenderSpec:
    # The first two hold both replicas until the test lets them go, so that the urgent
    # renders (every sixth) find them busy and preempt one.
    urgent = index % 6 == 5
    prompt = f"shot {index}" + (" held" if index < 2 else "") + (" that fails" if index % 7 == 3 else "")
    return pb.RenderSpec(model="ltx", task=pb.TASK_TEXT_TO_VIDEO, width=256, height=256, num_frames=17,
                         num_inference_steps=8, seed=index, priority=90 if urgent else 10, prompt=prompt,
                         idempotency_key=f"chaos-{index}")


def with_retries(call, deadline: float):
    """A call again while the store is cut (the client retries UNAVAILABLE itself; a cut
    can outlast its retries)."""
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_cutting_postgresql_under_load_loses_nothing_and_charges_everything_once(tmp_path):
    with postgres_role() as (url, role):
        model = ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "no-such-dir"})
        config = FarmConfig(home=tmp_path, models=[model], store={"url": url},
                            scheduler={"heartbeat_interval_s": 0.2, "lease_seconds": 20})
        config.gateway.port = config.gateway.metrics_port = 0
        metrics = ServeMetrics()
        with serving(config) as local:
            key = (config.keys_dir / "default.key").read_text().strip()
            released = threading.Event()
            scheduler = SchedulerThread(local.store, config, metrics, released)
            stop_cutting = threading.Event()
            cuts = []

            def cut() -> None:
                while not stop_cutting.wait(CUT_EVERY_S):
                    cuts.append(terminate_connections(role))

            deadline = time.monotonic() + WORKLOAD_TIMEOUT_S
            with concurrent.futures.ThreadPoolExecutor(1) as cutter, FarmClient(local.target, key) as client:
                cutter.submit(cut)
                try:
                    renders = [with_retries(lambda i=i: client.submit(spec(i)).id, deadline) for i in range(2)]
                    # Both held renders hold their engines before the urgent ones come.
                    while not all(with_retries(lambda r=r: client.get(r).step, deadline) >= 1 for r in renders):
                        assert time.monotonic() < deadline, "the held renders never started"
                        time.sleep(0.05)
                    renders += [with_retries(lambda i=i: client.submit(spec(i)).id, deadline)
                                for i in range(2, RENDERS)]
                    for render_id in renders[2::5]:  # cancels, some queued, some running
                        try:
                            with_retries(lambda r=render_id: client.cancel(r), deadline)
                        except grpc.RpcError as error:  # it ended first
                            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
                    while not any(with_retries(lambda r=r: client.get(r).preemptions, deadline) for r in renders[:2]):
                        assert time.monotonic() < deadline, "no held render was preempted"
                        time.sleep(0.1)
                    released.set()
                    while True:
                        states = [with_retries(lambda r=r: client.get(r).state, deadline) for r in renders]
                        if all(state in FINAL for state in states):
                            break
                        assert time.monotonic() < deadline, f"renders still not final: {states}"
                        time.sleep(0.2)
                finally:
                    stop_cutting.set()
            scheduler.stop()
            # The cuts hit work in flight: calls the gateway answered UNAVAILABLE, and the
            # scheduler's store calls that failed and were made again.
            gateway_errors = local.gateway.metrics.registry.get_sample_value("farm_gateway_store_errors_total")
            scheduler_errors = sum(sample.value for family in metrics.registry.collect()
                                   if family.name == "farm_store_errors" for sample in family.samples
                                   if sample.name == "farm_store_errors_total")
            print(f"cuts: {sum(cuts)} connections; gateway store errors {gateway_errors}, scheduler {scheduler_errors}")
            assert sum(cuts) > 0 and gateway_errors + scheduler_errors > 0
            check_each_render_ended_once(local.store, renders, metrics)


FINAL = {pb.RENDER_STATE_SUCCEEDED, pb.RENDER_STATE_FAILED, pb.RENDER_STATE_CANCELLED}


def check_each_render_ended_once(store: JobStore, renders: list[str], metrics: ServeMetrics) -> None:
    import sqlalchemy

    from farm.jobs import schema as t

    records = [store.get(None, render_id) for render_id in renders]
    states = {r.state for r in records}
    assert {RenderState.SUCCEEDED, RenderState.CANCELLED, RenderState.FAILED} <= states, states
    assert any(r.preemptions for r in records), "no render was preempted"
    for record in records:
        finals = [e for e in store.events_after(record.id, 0) if e.state.is_final]
        assert len(finals) == 1, (record.id, finals)
        with store._read() as session:
            outcomes = list(session.scalars(sqlalchemy.select(t.Attempt.outcome).where(
                t.Attempt.render_id == record.id)))
        assert outcomes.count("SUCCEEDED") == (record.state is RenderState.SUCCEEDED), (record.id, outcomes)
    ledger = store.ledger_total_nanodollars()
    assert ledger == sum(r.cost_nanodollars for r in records) > 0
    metric = sum(sample.value for family in metrics.registry.collect() if family.name == "farm_cost_dollars"
                 for sample in family.samples if sample.name == "farm_cost_dollars_total")
    assert round(metric * 1e9) == pytest.approx(ledger, abs=len(records) * 10)  # float sums of nanodollars
