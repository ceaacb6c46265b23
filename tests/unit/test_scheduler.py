"""The scheduler through its public surface, without Ray: a real SQLite job store, the
Scheduler's own loops in an event loop, and engine pools in memory (`FakePool`) whose
streams yield the typed events each test sends, when it sends them. Placement (device
kinds, memory, the free and the faster pool), preemption (checkpoint, requeue, resume;
only on a pool the urgent render fits), how attempts end (success charged by metering,
failures retried or not, cancels, lost replicas), fair share between tenants, the room
of a replica whose renders are post-processed, a wake-up that comes during a claim pass,
and a render that fails on every attempt on a one-node farm."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import pytest
import sqlalchemy

from farm.config import GIB, FarmConfig, ModelConfig, PoolConfig, Task
from farm.domain.engine import EngineRequest, RenderCancelled
from farm.domain.errors import EngineLost
from farm.domain.events import Done, EngineEvent, PhaseTiming, Preempted, RenderProgress
from farm.domain.spec import RenderSpec
from farm.domain.states import RenderState, Stage
from farm.families import Family
from farm.jobs.scheduler import Scheduler
from farm.jobs.scheduler import loop as scheduler_loop
from farm.jobs.store import JobStore
from farm.jobs.validation import resolve_spec
from farm.metering.charging import charge_timings
from farm.storage.artifacts import ArtifactStore

OWNER = "scheduler-test"
NODE = "host-1/a3f0c2d1e4b5"
STEP_S = 0.5
# A deadline for what must happen, never a pause: a scheduler that hangs fails the test.
WAIT_S = 30.0
BATCH, URGENT = 10, 90  # priorities of the default batch and urgent (preempting) classes


async def within(awaitable, what: str):
    try:
        return await asyncio.wait_for(awaitable, WAIT_S)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {WAIT_S:.0f} s waiting for {what}") from None


# The engine pool in memory ------------------------------------------------------------------

_END = object()


class FakeStream:
    """One attempt on a FakePool (a `RenderStream`): it yields the batches the test sends,
    each `send` returning once the scheduler has taken its batch in; `cancel` ends it as
    an engine does, with RenderCancelled at its next step."""

    def __init__(self, request: EngineRequest, device_kind: str):
        self.request, self.device_kind = request, device_kind
        self.cancelled = asyncio.Event()
        self.preempt_asked = asyncio.Event()
        self._items: asyncio.Queue = asyncio.Queue()
        self._step = 0

    def __aiter__(self):
        return self._batches()

    async def _batches(self):
        while True:
            item = await self._items.get()
            try:
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
            finally:
                self._items.task_done()  # the scheduler is done with it: it asked for more, or the stream ended

    def cancel(self) -> None:
        self.cancelled.set()
        self._items.put_nowait(RenderCancelled([], self._step))

    async def send(self, *events: EngineEvent) -> None:
        self._items.put_nowait(list(events))
        await self._taken()

    async def start(self, node: str = NODE) -> None:
        """The engine takes the render up (a stage change says where it runs)."""
        await self.send(RenderProgress(Stage.LOADING, at=time.time(), node=node))

    async def steps(self, *numbers: int) -> None:
        self._step = max(numbers)
        await self.send(*[RenderProgress(Stage.DENOISING, step=n, total_steps=self.request.num_inference_steps,
                                         step_seconds=STEP_S, at=time.time()) for n in numbers])

    async def stage(self, stage: Stage) -> None:
        await self.send(RenderProgress(stage, at=time.time(), node=NODE))

    async def done(self, timings: tuple[PhaseTiming, ...] | None = None) -> Done:
        done = Done(artifact_uri=f"file:///clips/{self.request.render_id}.mp4",
                    manifest_uri=f"file:///clips/{self.request.render_id}.json",
                    timings=rendered_timings(self.device_kind) if timings is None else timings,
                    device_kind=self.device_kind, node=NODE, frames=self.request.num_frames, seed=self.request.seed,
                    quality={"flicker": 0.1})
        await self.end(done)
        return done

    async def preempted(self, step: int, checkpoint_uri: str, timings: tuple[PhaseTiming, ...]) -> Preempted:
        preempted = Preempted(checkpoint_uri=checkpoint_uri, step=step, total_steps=self.request.num_inference_steps,
                              timings=timings, checkpoint_seconds=0.05, device_kind=self.device_kind, node=NODE)
        await self.end(preempted)
        return preempted

    async def end(self, *last: EngineEvent) -> None:
        """Ends the stream (after `last`, when given)."""
        if last:
            self._items.put_nowait(list(last))
        self._items.put_nowait(_END)
        await self._taken()

    async def fail(self, error: Exception) -> None:
        self._items.put_nowait(error)
        await self._taken()

    async def _taken(self) -> None:
        await within(self._items.join(), f"the scheduler to take in the events of {self.request.render_id}")


class FakePool:
    """An `EnginePool` of `slots` replicas in memory: each render gets a FakeStream that
    the test drives; it records what the scheduler asked of it."""

    def __init__(self, device_kind: str, slots: int = 1, relative_speed: float = 1.0, preemptible: bool = True,
                 model: str = "ltx", min_replicas: int = 0, max_replicas: int = 4):
        self.model, self.device_kind, self.slots = model, device_kind, slots
        self.relative_speed, self.preemptible = relative_speed, preemptible
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.backlog_target_s, self.cold_start_s = 60.0, 0.0
        self.requests: list[EngineRequest] = []
        self.preempted: list[tuple[str, int]] = []
        self.sizes: list[int] = []
        self._sized = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._streams: dict[tuple[str, int], asyncio.Future] = {}

    @property
    def key(self) -> str:
        return f"{self.model}/{self.device_kind}"

    def rendered(self) -> list[str]:
        return [request.render_id for request in self.requests]

    def render(self, request: EngineRequest) -> FakeStream:
        stream = FakeStream(request, self.device_kind)
        self.requests.append(request)
        self._stream((request.render_id, request.attempt)).set_result(stream)
        return stream

    async def dispatched(self, render_id: str, attempt: int = 1) -> FakeStream:
        """The stream of that attempt, once the scheduler has sent it here."""
        future = self._stream((render_id, attempt))
        return await within(asyncio.shield(future), f"attempt {attempt} of {render_id} on {self.key}")

    def preempt(self, render_id: str, attempt: int) -> None:
        # The scheduler calls this from a worker thread, as Serve's pool raises a flag in Ray's KV.
        self.preempted.append((render_id, attempt))
        stream = self._streams[(render_id, attempt)].result()
        self._loop.call_soon_threadsafe(stream.preempt_asked.set)

    async def refresh(self) -> None:
        pass

    def scale_to(self, replicas: int) -> None:
        self.sizes.append(replicas)
        self._sized.set()

    async def next_size(self) -> int:
        """The replicas the scheduler asks for in its next autoscaling round."""
        seen = len(self.sizes)
        await self.sized(seen + 1)
        return self.sizes[seen]

    async def sized(self, rounds: int = 1) -> None:
        """Returns once the scheduler has sized the pool in `rounds` autoscaling rounds in all."""
        while len(self.sizes) < rounds:
            self._sized.clear()
            await within(self._sized.wait(), f"autoscaling round {rounds} of {self.key}")

    def _stream(self, key: tuple[str, int]) -> asyncio.Future:
        return self._streams.setdefault(key, self._loop.create_future())


class Metrics:
    """`SchedulerMetrics` that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, args))

    def of(self, name: str) -> list[tuple]:
        return [args for called, args in self.calls if called == name]


def rendered_timings(device_kind: str) -> tuple[PhaseTiming, ...]:
    """The phases of a 4-step render, as a replica reports them with its `Done`."""
    return (PhaseTiming(Stage.ENCODING_PROMPT, device_kind, 0.25),
            *[PhaseTiming(Stage.DENOISING, device_kind, STEP_S)] * 4,
            PhaseTiming(Stage.DECODING, device_kind, 0.75),
            PhaseTiming(Stage.POSTPROCESSING, "CPU", 1.0), PhaseTiming(Stage.ENCODING, "CPU", 2.0),
            PhaseTiming(Stage.WRITING, "CPU", 0.5))


# The farm around it -----------------------------------------------------------------------


def farm_config(tmp_path, kinds=("H100",), **scheduler) -> FarmConfig:
    """One model on pools of these kinds (an H100 holds 80 GiB, an A100 40); the scheduler's
    loops look often, so that the tests run fast."""
    settings = dict(heartbeat_interval_s=0.2, cancel_poll_interval_s=0.05, event_flush_interval_s=0.01)
    settings.update(scheduler)
    pools = [PoolConfig(device_kind=kind, num_gpus=1, min_replicas=0, max_replicas=4) for kind in kinds]
    model = ModelConfig(name="ltx", family=Family.LTX_VIDEO, sources={Task.TEXT_TO_VIDEO: "d"}, pools=pools)
    return FarmConfig(home=tmp_path, models=[model], devices={"memory_gib": {"H100": 80, "A100": 40}},
                      artifacts={"url": str(tmp_path / "artifacts")}, scheduler=settings)


class Farm:
    """The store and the config; renders submitted with the store's public API."""

    def __init__(self, store: JobStore, config: FarmConfig):
        self.store, self.config = store, config
        self.models = {m.name: m for m in config.served_models()}

    def tenant(self, name: str = "studio") -> str:
        return self.store.create_tenant(name)[0].id

    def submit(self, tenant_id: str, priority: int = BATCH, steps: int = 4, require: str = "", prefer: str = "",
               memory_gib: float | None = None) -> str:
        request = RenderSpec(model="ltx", task=Task.TEXT_TO_VIDEO, prompt="a lighthouse at dusk", width=256,
                             height=256, num_frames=17, num_inference_steps=steps, priority=priority,
                             require_device_kind=require, prefer_device_kind=prefer)
        spec = resolve_spec(request, self.models)
        if memory_gib is not None:  # what the gateway's memory estimate would have stored
            spec = dataclasses.replace(spec, memory_bytes=int(memory_gib * GIB))
        return self.store.submit(tenant_id, request, spec)[0].id

    def get(self, render_id: str):
        return self.store.get(None, render_id)

    def state(self, render_id: str) -> RenderState:
        return self.get(render_id).state


@pytest.fixture
def store(tmp_path):
    job_store = JobStore(f"sqlite:///{tmp_path / 'farm.db'}")
    yield job_store
    job_store.close()


@contextlib.asynccontextmanager
async def scheduling(store: JobStore, config: FarmConfig, *pools: FakePool, metrics: Metrics | None = None):
    scheduler = Scheduler(store, {"ltx": list(pools)}, config, OWNER, metrics or Metrics())
    scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.stop()


def charges_of(record) -> list[tuple]:
    return sorted((c.attempt, c.phase, c.device_kind, c.device_seconds, c.nanodollars) for c in record.charges)


def priced(config: FarmConfig, attempt: int, timings) -> list[tuple]:
    return sorted((attempt, c.phase, c.device_kind, c.device_seconds, c.nanodollars)
                  for c in charge_timings(config.prices, timings).charges)


# Placement ----------------------------------------------------------------------------------


def test_a_render_goes_to_the_kind_it_requires_and_else_to_the_faster_pool(store, tmp_path):
    config = farm_config(tmp_path, kinds=("H100", "A100"))
    farm = Farm(store, config)
    tenant = farm.tenant()
    needs_h100 = farm.submit(tenant, require="H100")
    anywhere = farm.submit(tenant)

    async def scenario():
        h100, a100 = FakePool("H100"), FakePool("A100", relative_speed=10.0)
        async with scheduling(store, config, h100, a100):
            await h100.dispatched(needs_h100)
            await a100.dispatched(anywhere)  # ten times faster: it finishes there first
        return h100.rendered(), a100.rendered()

    assert asyncio.run(scenario()) == ([needs_h100], [anywhere])


def test_a_second_render_goes_to_the_idle_pool_and_a_preference_breaks_ties(store, tmp_path):
    config = farm_config(tmp_path, kinds=("H100", "A100"))
    farm = Farm(store, config)
    tenant = farm.tenant()
    first, second = farm.submit(tenant), farm.submit(tenant)

    async def scenario():
        h100, a100 = FakePool("H100"), FakePool("A100")
        async with scheduling(store, config, h100, a100) as scheduler:
            # As fast as each other: the second would wait behind the first on the H100s.
            await h100.dispatched(first)
            await a100.dispatched(second)
            for stream in (await h100.dispatched(first), await a100.dispatched(second)):
                await stream.start()
                await stream.done()
            await scheduler.wait_idle()
            # Both idle again: the first pool listed wins a tie, unless the render prefers the other.
            preferring_a100 = farm.submit(tenant, prefer="A100")
            await a100.dispatched(preferring_a100)
        return h100.rendered(), a100.rendered(), preferring_a100

    h100, a100, preferring_a100 = asyncio.run(scenario())
    assert (h100, a100) == ([first], [second, preferring_a100])


def test_a_render_too_big_for_a_pool_never_goes_there_and_waits_for_the_pool_it_fits(store, tmp_path):
    """60 GiB fits the H100s (80 GiB), not the A100s (40 GiB), though those are ten times
    faster; while the H100 pool has no replica it stays queued (a small render behind it
    goes to the A100s), and its backlog asks the H100 pool, not the A100s, to grow."""
    config = farm_config(tmp_path, kinds=("H100", "A100"), autoscale_interval_s=60)
    farm = Farm(store, config)
    tenant = farm.tenant()
    big = farm.submit(tenant, memory_gib=60)
    small = farm.submit(tenant, memory_gib=1)

    async def scenario():
        h100, a100 = FakePool("H100", slots=0), FakePool("A100", relative_speed=10.0)
        async with scheduling(store, config, h100, a100) as scheduler:
            await h100.sized()  # the autoscaling loop's round at start; the next is the test's own
            on_a100 = await a100.dispatched(small)
            await scheduler.claim_pass()
            assert farm.state(big) is RenderState.QUEUED and a100.rendered() == [small]
            await on_a100.start()
            await on_a100.done()
            await scheduler.wait_idle()
            await scheduler.autoscale_pass()
            # The backlog is the H100s' alone: the idle A100s, ten times faster, are asked for none.
            assert h100.sizes[-1] >= 1 and a100.sizes[-1] == 0
            assert farm.state(big) is RenderState.QUEUED
            h100.slots = 1  # its replica is up
            await scheduler.claim_pass()
            await h100.dispatched(big)
        return h100.rendered(), a100.rendered()

    assert asyncio.run(scenario()) == ([big], [small])


def test_a_render_goes_only_to_a_pool_it_fits_even_a_full_one_and_one_without_an_estimate_anywhere(store, tmp_path):
    """With room on both pools a small render goes to the faster A100s. 60 GiB fits the
    H100s (80 GiB), not the A100s (40 GiB): two such renders claimed in one pass both go
    to the H100s, the second though the H100 has no room left and the A100s have. A
    render stored without a memory estimate (queued before there were any) may go
    anywhere: to the A100s, while one of 60 GiB beside it stays queued."""
    config = farm_config(tmp_path, kinds=("H100", "A100"), prefetch_per_replica=0)
    farm = Farm(store, config)
    tenant = farm.tenant()
    small = farm.submit(tenant, memory_gib=1)
    big = [farm.submit(tenant, memory_gib=60) for _ in range(2)]

    async def scenario():
        h100, a100 = FakePool("H100"), FakePool("A100", slots=2, relative_speed=10.0)
        async with scheduling(store, config, h100, a100) as scheduler:
            # The first pass claims all three (room for one on the H100s, two on the A100s),
            # oldest first: the small one while both pools have room.
            await a100.dispatched(small)
            for render in big:
                await h100.dispatched(render)
            too_big = farm.submit(tenant, memory_gib=60)
            unknown = farm.submit(tenant)  # no estimate stored
            await a100.dispatched(unknown)
            await scheduler.claim_pass()
            assert farm.state(too_big) is RenderState.QUEUED
        return h100.rendered(), a100.rendered(), unknown

    h100, a100, unknown = asyncio.run(scenario())
    assert (h100, a100) == (big, [small, unknown])


# Preemption -------------------------------------------------------------------------------


def test_an_urgent_render_preempts_a_batch_render_which_resumes_from_its_checkpoint(store, tmp_path):
    config = farm_config(tmp_path)
    farm = Farm(store, config)
    tenant = farm.tenant()
    batch = farm.submit(tenant, priority=BATCH)
    artifacts = ArtifactStore(config.artifacts_url)
    checkpoint = artifacts.write_checkpoint(batch, 1, b"the latents after step 2")
    before = (PhaseTiming(Stage.ENCODING_PROMPT, "H100", 0.25), PhaseTiming(Stage.DENOISING, "H100", 2 * STEP_S))
    metrics = Metrics()

    async def scenario():
        pool = FakePool("H100")
        async with scheduling(store, config, pool, metrics=metrics) as scheduler:
            first = await pool.dispatched(batch)
            await first.start()
            await first.steps(1, 2)
            urgent = farm.submit(tenant, priority=URGENT)
            await within(first.preempt_asked.wait(), "the batch render to be preempted")
            await scheduler.claim_pass()
            # Claimed, but held back from the busy replica until the batch render lets it go.
            assert farm.state(urgent) is RenderState.RUNNING and pool.rendered() == [batch]
            await first.preempted(2, checkpoint, before)
            rushed = await pool.dispatched(urgent)
            await rushed.start()
            await rushed.steps(1, 2, 3, 4)
            await rushed.done()
            resumed = await pool.dispatched(batch, attempt=2)
            assert resumed.request.resume_from == checkpoint
            await resumed.start()
            await resumed.steps(3, 4)
            done = await resumed.done()
            await scheduler.wait_idle()
        return urgent, done, pool

    urgent, done, pool = asyncio.run(scenario())
    assert pool.preempted == [(batch, 1)] and pool.rendered() == [batch, urgent, batch]
    assert farm.state(urgent) is RenderState.SUCCEEDED
    record = farm.get(batch)
    assert (record.state, record.attempt, record.preemptions) == (RenderState.SUCCEEDED, 2, 1)
    # Charged for the steps done before the preemption, and for its resumed attempt.
    assert charges_of(record) == sorted(priced(config, 1, before) + priced(config, 2, done.timings))
    with pytest.raises(FileNotFoundError):  # final: its checkpoints are of no more use
        artifacts.read_checkpoint(checkpoint)
    assert metrics.of("preempted") == [("ltx", "H100")]


def test_an_urgent_render_preempts_only_a_render_on_a_pool_it_fits(store, tmp_path):
    """Both pools busy with batch renders, the A100's claimed last (so the victim, were
    memory not counted); the urgent render needs 60 GiB, which only the H100s hold: the
    H100's batch render is preempted, the A100's renders on."""
    config = farm_config(tmp_path, kinds=("H100", "A100"), prefetch_per_replica=0)
    farm = Farm(store, config)
    tenant = farm.tenant()

    async def scenario():
        h100, a100 = FakePool("H100"), FakePool("A100", relative_speed=10.0)
        async with scheduling(store, config, h100, a100) as scheduler:
            on_h100 = farm.submit(tenant, require="H100", memory_gib=1)
            h100_stream = await h100.dispatched(on_h100)
            await h100_stream.start()
            await h100_stream.steps(1)
            on_a100 = farm.submit(tenant, require="A100", memory_gib=1)
            a100_stream = await a100.dispatched(on_a100)
            await a100_stream.start()
            await a100_stream.steps(1)
            urgent = farm.submit(tenant, priority=URGENT, memory_gib=60)
            await scheduler.claim_pass()
            await within(h100_stream.preempt_asked.wait(), "the H100's batch render to be preempted")
            await scheduler.claim_pass()
            # No room anywhere until the H100's render has written its checkpoint.
            assert farm.state(urgent) is RenderState.QUEUED
        return h100.preempted, a100.preempted, on_h100

    h100_preempted, a100_preempted, on_h100 = asyncio.run(scenario())
    assert (h100_preempted, a100_preempted) == ([(on_h100, 1)], [])


# How attempts end -------------------------------------------------------------------------


def test_a_done_render_succeeds_charged_for_every_phase_it_reports(store, tmp_path):
    config = farm_config(tmp_path)
    farm = Farm(store, config)
    tenant = farm.tenant()
    render = farm.submit(tenant)
    metrics = Metrics()

    async def scenario():
        pool = FakePool("H100")
        async with scheduling(store, config, pool, metrics=metrics) as scheduler:
            stream = await pool.dispatched(render)
            await stream.start()
            await stream.steps(1, 2, 3, 4)
            done = await stream.done()
            await scheduler.wait_idle()
        return done

    done = asyncio.run(scenario())
    record = farm.get(render)
    assert record.state is RenderState.SUCCEEDED
    assert (record.artifact_uri, record.manifest_uri, record.device_kind) == (
        done.artifact_uri, done.manifest_uri, "H100")
    assert record.quality == {"flicker": 0.1}
    # The four steps make one DENOISING charge: 2 s at $3.00 per H100-hour.
    denoising = next(c for c in record.charges if c.phase == Stage.DENOISING)
    assert (denoising.device_kind, denoising.device_seconds, denoising.nanodollars) == ("H100", 4 * STEP_S, 1_666_667)
    assert charges_of(record) == priced(config, 1, done.timings)
    assert store.ledger_total_nanodollars(tenant) == record.cost_nanodollars == sum(c.nanodollars
                                                                                   for c in record.charges)
    [finished] = metrics.of("render_finished")
    assert finished[:5] == ("studio", "ltx", "SUCCEEDED", finished[3], 17)
    assert sum(c.nanodollars for c in finished[5]) == record.cost_nanodollars


def test_a_cancelled_render_stops_and_is_charged_for_the_steps_it_did(store, tmp_path):
    config = farm_config(tmp_path)
    farm = Farm(store, config)
    tenant = farm.tenant()
    render = farm.submit(tenant)

    async def scenario():
        pool = FakePool("H100")
        async with scheduling(store, config, pool) as scheduler:
            stream = await pool.dispatched(render)
            await stream.start()
            await stream.steps(1, 2)
            store.request_cancel(tenant, render)
            await within(stream.cancelled.wait(), "the engine to be told to stop")
            await scheduler.wait_idle()

    asyncio.run(scenario())
    record = farm.get(render)
    assert (record.state, record.attempt) == (RenderState.CANCELLED, 1)
    assert charges_of(record) == priced(config, 1, [(Stage.DENOISING, "H100", 2 * STEP_S)])


def test_a_render_failing_mid_way_is_retried_on_another_node_then_fails_after_the_limit(store, tmp_path):
    config = farm_config(tmp_path, failed_node_limit=2)
    farm = Farm(store, config)
    tenant = farm.tenant()
    render = farm.submit(tenant)

    async def scenario():
        pool = FakePool("H100")
        async with scheduling(store, config, pool) as scheduler:
            for attempt, node in enumerate(["host-a/0001", "host-b/0002"], start=1):
                stream = await pool.dispatched(render, attempt)
                await stream.start(node)
                await stream.steps(1)
                await stream.fail(RuntimeError(f"CUDA error: an illegal memory access on {node}"))
            await scheduler.wait_idle()
        return pool

    pool = asyncio.run(scenario())
    # The retry was told where the first attempt failed (the router sends it elsewhere).
    assert [(r.attempt, r.avoid_nodes) for r in pool.requests] == [(1, ()), (2, ("host-a/0001",))]
    record = farm.get(render)
    assert (record.state, record.attempt) == (RenderState.FAILED, 2)
    assert "failed 2 times on 2 nodes" in record.error and "host-b/0002: RuntimeError: CUDA error" in record.error
    step = [(Stage.DENOISING, "H100", STEP_S)]
    assert charges_of(record) == sorted(priced(config, 1, step) + priced(config, 2, step))


@pytest.mark.parametrize("ending, error", [
    (ValueError("num_frames must be 8k + 1"), "ValueError: num_frames must be 8k + 1"),
    (None, "the engine ended the render without a result"),
])
def test_a_failure_that_is_the_render_s_own_fails_it_at_once(store, tmp_path, ending, error):
    config = farm_config(tmp_path)
    farm = Farm(store, config)
    render = farm.submit(farm.tenant())

    async def scenario():
        pool = FakePool("H100")
        async with scheduling(store, config, pool) as scheduler:
            stream = await pool.dispatched(render)
            await stream.start()
            await (stream.fail(ending) if ending else stream.end())
            await scheduler.wait_idle()
        return pool

    pool = asyncio.run(scenario())
    record = farm.get(render)
    assert (record.state, record.attempt, record.error) == (RenderState.FAILED, 1, error)
    assert pool.rendered() == [render]


def test_a_render_whose_replica_is_lost_runs_again_and_the_farm_absorbs_the_lost_work(store, tmp_path):
    config = farm_config(tmp_path)
    farm = Farm(store, config)
    tenant = farm.tenant()
    render = farm.submit(tenant)
    metrics = Metrics()

    async def scenario():
        pool = FakePool("H100")
        async with scheduling(store, config, pool, metrics=metrics) as scheduler:
            lost = await pool.dispatched(render)
            await lost.start()
            await lost.steps(1, 2)
            await lost.fail(EngineLost("the replica's actor died"))
            again = await pool.dispatched(render, attempt=2)
            await again.start()
            await again.steps(1, 2, 3, 4)
            done = await again.done()
            await scheduler.wait_idle()
        return done

    done = asyncio.run(scenario())
    record = farm.get(render)
    assert (record.state, record.attempt) == (RenderState.SUCCEEDED, 2)
    assert charges_of(record) == priced(config, 2, done.timings)  # the lost attempt is not charged
    absorbed = priced(config, 1, [(Stage.DENOISING, "H100", 2 * STEP_S)])
    assert store.ledger_total_nanodollars(charged=False) == sum(c[-1] for c in absorbed) > 0
    assert [sum(c.nanodollars for c in charges) for _, charges in metrics.of("attempt_absorbed")] == [
        sum(c[-1] for c in absorbed)]
    assert metrics.of("attempt_lost") == [("ltx", "H100", "replica")]


def test_the_queue_depth_is_published_per_model_at_each_autoscaling_pass(store, tmp_path):
    config = farm_config(tmp_path)
    farm = Farm(store, config)
    tenant = farm.tenant()
    metrics = Metrics()

    async def scenario():
        pool = FakePool("H100", slots=1)
        async with scheduling(store, config, pool, metrics=metrics) as scheduler:
            first = farm.submit(tenant)
            running = await pool.dispatched(first)
            waiting = [farm.submit(tenant) for _ in range(3)]  # behind the first: the pool has one slot
            await scheduler.claim_pass()
            await scheduler.autoscale_pass()
            published = metrics.of("queued")[-1]
            queued = sum(farm.get(r).state is RenderState.QUEUED for r in waiting)
            await running.start()
            await running.fail(RuntimeError("stop"))
            return published, queued

    published, queued = asyncio.run(scenario())
    # The three, less any the scheduler claimed ahead (prefetch) to wait in the replica.
    assert published == ("ltx", queued) and queued >= 2


def test_a_stopping_scheduler_hands_every_render_back_to_the_queue(store, tmp_path):
    """A started render checkpoints and resumes later; one that does not answer its
    preemption in time is withdrawn, its work absorbed; one not started is withdrawn."""
    config = farm_config(tmp_path)
    farm = Farm(store, config)
    tenant = farm.tenant()
    checkpointing, unanswering, waiting = (farm.submit(tenant) for _ in range(3))
    metrics = Metrics()

    async def scenario():
        pool = FakePool("H100", slots=2)
        scheduler = Scheduler(store, {"ltx": [pool]}, config, OWNER, metrics)
        scheduler.start()
        first = await pool.dispatched(checkpointing)
        await first.start()
        await first.steps(1, 2)
        second = await pool.dispatched(unanswering)
        await second.start()
        await second.steps(1)
        draining = asyncio.create_task(scheduler.drain(timeout_s=0.5))
        await within(first.preempt_asked.wait(), "the started render's preemption")
        await first.preempted(2, "file:///checkpoints/a", (PhaseTiming(Stage.DENOISING, "H100", 2 * STEP_S),))
        await within(second.cancelled.wait(), "the unanswered render to be withdrawn")
        await within(draining, "the drain")
        assert not scheduler.running and all(task.done() for task in scheduler._tasks)
        return second

    asyncio.run(scenario())
    resumed, lost, queued = farm.get(checkpointing), farm.get(unanswering), farm.get(waiting)
    assert (resumed.state, resumed.attempt, resumed.preemptions, resumed.checkpoint_uri) == (
        RenderState.QUEUED, 2, 1, "file:///checkpoints/a")
    assert charges_of(resumed) == priced(config, 1, [(Stage.DENOISING, "H100", 2 * STEP_S)])
    assert (lost.state, lost.attempt, charges_of(lost)) == (RenderState.QUEUED, 2, [])
    assert store.ledger_total_nanodollars(charged=False) > 0  # its step, absorbed by the farm
    assert queued.state is RenderState.QUEUED and queued.preemptions == 0
    assert metrics.of("attempt_lost") == [("ltx", "H100", "stopped")]


class AnswerLosingStore(JobStore):
    """A real store whose next ending commits and then loses its answer, as when the
    connection dies between PostgreSQL's commit and its reply."""

    lose = {"finish": 0, "preempt": 0, "budget_status": 0}

    def _lost_answer(self, name: str, result):
        if self.lose[name]:
            self.lose[name] -= 1
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))
        return result

    def finish(self, *args, **kwargs):
        return self._lost_answer("finish", super().finish(*args, **kwargs))

    def preempt(self, *args, **kwargs):
        return self._lost_answer("preempt", super().preempt(*args, **kwargs))

    def budget_status(self, *args, **kwargs):
        return self._lost_answer("budget_status", super().budget_status(*args, **kwargs))


@pytest.mark.parametrize("lost", ["finish", "preempt", "budget_status"])
def test_an_ending_whose_answer_was_lost_is_written_once_and_counted_once(tmp_path, lost):
    """The ledger, the render's cost and the metrics agree although the scheduler wrote
    the ending twice (the retry finds it committed, writes nothing and counts it), or a
    store call after the ending failed (the budget gauge's: the ending is not written again)."""
    store = AnswerLosingStore(f"sqlite:///{tmp_path / 'farm.db'}")
    store.lose = {"finish": 0, "preempt": 0, "budget_status": 0, lost: 1}
    ending = "preempt" if lost == "preempt" else "finish"
    config = farm_config(tmp_path)
    farm = Farm(store, config)
    tenant = farm.tenant()
    render = farm.submit(tenant)
    metrics = Metrics()

    async def scenario():
        pool = FakePool("H100")
        async with scheduling(store, config, pool, metrics=metrics) as scheduler:
            stream = await pool.dispatched(render)
            await stream.start()
            await stream.steps(1, 2)
            if ending == "finish":
                await stream.steps(3, 4)
                await stream.done()
            else:
                await stream.preempted(2, "file:///checkpoints/r", (PhaseTiming(Stage.DENOISING, "H100", 2 * STEP_S),))
                await pool.dispatched(render, attempt=2)  # requeued once, and claimed again


                async def charged():
                    while not metrics.of("charged"):
                        await asyncio.sleep(0.01)

                await within(charged(), "the ending's second try, 0.2 s after the first")
                return
            await within(scheduler.wait_idle(), "the ending to be written")

    try:
        asyncio.run(scenario())
        record = farm.get(render)
        assert (record.state, record.attempt, record.preemptions) == (
            (RenderState.SUCCEEDED, 1, 0) if ending == "finish" else (RenderState.RUNNING, 2, 1))
        ledger = store.ledger_total_nanodollars(tenant)
        counted = sum(c.nanodollars for _, _, charges in metrics.of("charged") for c in charges) + sum(
            c.nanodollars for *_, charges in metrics.of("render_finished") for c in charges)
        assert ledger == record.cost_nanodollars == counted > 0
        assert len(metrics.of("render_finished")) == (ending == "finish")
        assert metrics.of("store_error") == ([] if lost == "budget_status" else [("ending",)])
    finally:
        store.close()


# Fair share -------------------------------------------------------------------------------


def test_one_tenant_s_backlog_does_not_starve_another_tenant_s_render(store, tmp_path):
    config = farm_config(tmp_path, prefetch_per_replica=0, postprocessing_per_replica=0)
    farm = Farm(store, config)
    busy, other = farm.tenant("busy"), farm.tenant("other")
    backlog = [farm.submit(busy) for _ in range(3)]
    single = farm.submit(other)  # the newest

    async def scenario():
        pool = FakePool("H100", slots=2)
        async with scheduling(store, config, pool) as scheduler:
            first = await pool.dispatched(backlog[0])
            await pool.dispatched(single)
            await scheduler.claim_pass()
            assert sorted(pool.rendered()) == sorted([backlog[0], single])
            assert [farm.state(r) for r in backlog[1:]] == [RenderState.QUEUED] * 2
            await first.start()
            await first.done()
            await pool.dispatched(backlog[1])  # the freed slot goes to the busy tenant's next
        return pool.rendered()

    assert asyncio.run(scenario()) == [backlog[0], single, backlog[1]]


# A replica's room ---------------------------------------------------------------------------


def test_an_engine_takes_the_next_render_while_its_last_one_is_post_processed(store, tmp_path):
    """A render in POSTPROCESSING or WRITING no longer needs its replica's engine: the
    pool has room for the next render, up to postprocessing_per_replica such renders
    more per replica; it is neither counted busy nor preemptible; a quality-gate retry
    takes it back into the engine."""
    config = farm_config(tmp_path, autoscale_interval_s=0.05)
    assert (config.scheduler.prefetch_per_replica, config.scheduler.postprocessing_per_replica) == (1, 2)
    farm = Farm(store, config)
    tenant = farm.tenant()
    renders = [farm.submit(tenant) for _ in range(4)]

    async def scenario():
        pool = FakePool("H100", slots=1)
        async with scheduling(store, config, pool) as scheduler:
            first, second = await pool.dispatched(renders[0]), await pool.dispatched(renders[1])
            await scheduler.claim_pass()
            assert pool.rendered() == renders[:2]  # rendering one, holding the next
            await first.start()
            await first.steps(1, 2, 3, 4)
            await first.stage(Stage.POSTPROCESSING)
            third = await pool.dispatched(renders[2])
            await second.start()
            await second.stage(Stage.WRITING)
            fourth = await pool.dispatched(renders[3])
            await third.start()
            await third.stage(Stage.POSTPROCESSING)
            # Autoscaling sees one busy replica (the fourth render's engine), not four renders' worth.
            busy_only = await pool.next_size()
            # Engine room for one more, but the replica holds its most: 1 + 1 prefetched + 2 post-processing.
            fifth = farm.submit(tenant)
            await scheduler.claim_pass()
            assert farm.state(fifth) is RenderState.QUEUED
            await first.stage(Stage.DENOISING)  # a quality-gate retry renders a new seed
            await scheduler.claim_pass()
            assert farm.state(fifth) is RenderState.QUEUED
            await first.stage(Stage.POSTPROCESSING)
            await fourth.start()
            await fourth.steps(1)
            # An urgent render preempts the one render on the engine, not those it has let go of.
            farm.submit(tenant, priority=URGENT)
            await scheduler.claim_pass()
            await within(fourth.preempt_asked.wait(), "the fourth render to be preempted")
        return pool, busy_only

    pool, busy_only = asyncio.run(scenario())
    assert pool.rendered() == renders
    assert pool.preempted == [(renders[3], 1)]
    assert busy_only == 1


# Waking the claim loop ----------------------------------------------------------------------


class Unannounced:
    """A change detector that hears of nothing: the claim loop looks for work only when
    woken (or after its fallback interval)."""

    pushed = True

    def changed(self) -> bool:
        return False

    def close(self) -> None:
        pass


class PausingStore:
    """The job store as the scheduler sees it, but that the claim loop's first look for
    queued work (`has_queued`), once it has looked, waits there until the test calls
    `go_on`; and no change in it is announced (`Unannounced`)."""

    def __init__(self, store: JobStore):
        self._store = store
        self._loop = asyncio.get_running_loop()
        self.looked = asyncio.Event()
        self._go_on = threading.Event()
        self._paused = False

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def change_detector(self, on_change=None, channel=None) -> Unannounced:
        return Unannounced()

    def has_queued(self, models) -> bool:
        # Called in a worker thread of the claim pass.
        queued = self._store.has_queued(models)
        if not self._paused:
            self._paused = True
            self._loop.call_soon_threadsafe(self.looked.set)
            self._go_on.wait(WAIT_S)
        return queued

    def go_on(self) -> None:
        self._go_on.set()


def test_a_wake_up_during_a_claim_pass_brings_another_pass_at_once(store, tmp_path, monkeypatch):
    """A render submitted while a claim pass is under way, after the pass looked for work,
    is claimed at once: the wake-up that came during the pass is kept for the next pass,
    which looks again. (It was lost: the loop cleared it after the empty pass and waited
    for its fallback poll.)"""
    # A fallback poll past the test's deadline: only the wake-up can get the render claimed.
    monkeypatch.setattr(scheduler_loop, "PUSHED_FALLBACK_S", 10 * WAIT_S)
    config = farm_config(tmp_path, autoscale_interval_s=60)
    farm = Farm(store, config)
    tenant = farm.tenant()

    async def scenario():
        pool = FakePool("H100")
        paused = PausingStore(store)
        async with scheduling(paused, config, pool) as scheduler:
            try:
                await within(paused.looked.wait(), "the claim loop's first pass to look for work")
                # The autoscaling round at start ends in a wake-up of its own: it comes now, during the pass.
                await pool.sized()
                render = farm.submit(tenant)
                scheduler.wake()
            finally:
                paused.go_on()
            await pool.dispatched(render)
        return pool.rendered(), render

    rendered, render = asyncio.run(scenario())
    assert rendered == [render]


# A render that fails on every attempt, on a farm of one node ------------------------------


class Fence:
    """The scheduler's NodeFence; OneNodePool honours it as Serve's EngineRouter does."""

    def __init__(self) -> None:
        self.excluded: dict[str, float] = {}

    def exclude(self, node: str, until: float) -> None:
        self.excluded[node] = until

    def closed(self, node: str) -> bool:
        return self.excluded.get(node, 0.0) > time.time()


class OneNodePool:
    """One engine replica on one node, as the scheduler sees it through Serve, rendering on
    its own: a request waits while the node is quarantined (the router has no replica to
    give it); a render of one step fails after it started, as LTX-Video's scheduler did
    (IndexError); any other render succeeds."""

    model, device_kind, slots = "ltx", "CPU", 1
    min_replicas = max_replicas = 1
    backlog_target_s, relative_speed, preemptible, cold_start_s = 60.0, 1.0, False, 0.0
    key = "ltx/CPU"

    def __init__(self, fence: Fence) -> None:
        self.fence = fence
        self.requests: list[EngineRequest] = []

    def render(self, request: EngineRequest) -> OneNodeStream:
        self.requests.append(request)
        return OneNodeStream(self, request)

    def preempt(self, render_id: str, attempt: int) -> None:
        pass

    async def refresh(self) -> None:
        pass

    def scale_to(self, replicas: int) -> None:
        pass


async def until_final(store, render_id: str, timeout_s: float = WAIT_S):
    """The render's record once it is final (the store polled: the one-node pool below
    ends renders on its own, with no test sending their events)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        record = await asyncio.to_thread(store.get, None, render_id)
        if record.state.is_final:
            return record
        assert asyncio.get_running_loop().time() < deadline, (
            f"{render_id} is still {record.state.value} (attempt {record.attempt}, stage {record.stage.value}) "
            f"after {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


class OneNodeStream:
    def __init__(self, pool: OneNodePool, request: EngineRequest) -> None:
        self.pool, self.request = pool, request

    def __aiter__(self):
        return self._events()

    async def _events(self):
        while self.pool.fence.closed(NODE):  # as Serve's router: it retries until a replica may have it
            await asyncio.sleep(0.01)
        yield [RenderProgress(Stage.LOADING, at=time.time(), node=NODE)]
        if self.request.num_inference_steps == 1:
            raise IndexError("index 0 is out of bounds for dimension 0 with size 0")
        yield [RenderProgress(Stage.DENOISING, step=1, total_steps=1, step_seconds=0.01, at=time.time())]
        yield [Done(artifact_uri="file:///clip.mp4", manifest_uri="file:///manifest.json",
                    timings=(PhaseTiming(Stage.DENOISING, "CPU", 0.01),), device_kind="CPU", node=NODE,
                    frames=self.request.num_frames, seed=self.request.seed)]

    def cancel(self) -> None:
        pass


def test_a_render_failing_on_every_attempt_on_a_one_node_farm_fails_and_holds_up_no_one(store):
    """SubmitRender{ltx, 1 step} wedged a one-node farm: each attempt failed on the only
    node, the render was queued again for ever (it never failed on 3 *different* nodes),
    and its third failure quarantined the node, so its fourth attempt, and every other
    tenant's render, waited for the quarantine (300 s) to end. Now it fails after
    `failed_node_limit` attempts, its repeated failures count once towards the node's
    quarantine, and the other tenant's renders run."""
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

    async def scenario():
        fence = Fence()
        pool = OneNodePool(fence)
        scheduler = Scheduler(store, {"ltx": [pool]}, config, OWNER, Metrics(), fence=fence)
        bad = submit_render(studio_a.id, steps=1)
        beside = submit_render(studio_b.id, steps=2)
        scheduler.start()
        try:
            failed = await until_final(store, bad.id)
            after = submit_render(studio_b.id, steps=2)
            finished = [await until_final(store, beside.id), await until_final(store, after.id)]
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
