"""One render attempt without Ray (`farm.render.attempt`): the tiny LTX-Video engine, its
chunks post-processed in a local thread, artifacts in a temporary directory, holds and
preemptions in this process. Its typed stream, the MP4 and manifest it writes,
candidates, the quality gate (fail, and retry with new seeds), preemption with a
checkpoint a later attempt resumes from, and cancellation at a step boundary."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys

import av
import fsspec
import numpy as np
import pytest

from farm.config import PostprocConfig, QualityGate, Task
from farm.domain.engine import DenoiseCheckpoint, EngineRequest, RenderCancelled, RenderOutput
from farm.domain.events import Done, PhaseTiming, Preempted, RenderProgress
from farm.domain.spec import ResolvedPostprocess
from farm.domain.states import Stage
from farm.postproc.encode import probe_mp4
from farm.postproc.pipeline import LocalChunkRunner
from farm.render import attempt as attempt_module
from farm.render.attempt import AttemptRunner, QualityRejected
from farm.storage.artifacts import ArtifactStore
from tests.holds import LocalHolds, PreemptionFlags

HOLD_TIMEOUT_S = 120.0


class RecordingEngine:
    """The engine, recording what each of its renders returned or raised."""

    def __init__(self, engine):
        self._engine = engine
        self.outcomes: list[RenderOutput | BaseException] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def render(self, *args, **kwargs) -> RenderOutput:
        try:
            output = self._engine.render(*args, **kwargs)
        except BaseException as error:
            self.outcomes.append(error)
            raise
        self.outcomes.append(output)
        return output


@dataclasses.dataclass
class Bench:
    runner: AttemptRunner
    engine: RecordingEngine
    holds: LocalHolds
    preemption: PreemptionFlags
    artifacts: ArtifactStore


@pytest.fixture
def bench_for(engines, tmp_path):
    """bench_for(**postproc) -> a runner of attempts on the tiny LTX-Video, with what it was given."""
    made: list[tuple[AttemptRunner, LocalChunkRunner]] = []

    def make(**postproc) -> Bench:
        engine = RecordingEngine(engines["ltx-video-tiny"])
        chunks, holds, preemption = LocalChunkRunner(workers=1), LocalHolds(), PreemptionFlags()
        artifacts = ArtifactStore(str(tmp_path / "artifacts"))
        runner = AttemptRunner(engine, chunks, artifacts, preemption,
                               postproc=PostprocConfig(chunk_frames=4, **postproc), holds=holds, node="here")
        made.append((runner, chunks))
        return Bench(runner, engine, holds, preemption, artifacts)

    yield make
    for runner, chunks in made:
        runner.render_thread.executor.shutdown(wait=True)
        chunks.close()


@pytest.fixture
def bench(bench_for) -> Bench:
    return bench_for()


def request(post: ResolvedPostprocess | None = None, seed: int = 10, **fields) -> EngineRequest:
    values = dict(render_id="r-post", attempt=1, task=Task.TEXT_TO_VIDEO, prompt="a lighthouse at night",
                  negative_prompt="", image=None, width=64, height=64, num_frames=9, fps=8,
                  num_inference_steps=2, guidance_scale=3.0, seed=seed, postprocess=post)
    values.update(fields)
    return EngineRequest(**values)


async def collect(runner: AttemptRunner, req: EngineRequest, batches: list | None = None) -> list:
    events = []
    async for batch in runner.run(req):
        assert isinstance(batch, list) and batch
        if batches is not None:
            batches.append(batch)
        events += batch
    return events


def run(runner: AttemptRunner, req: EngineRequest) -> tuple[list, BaseException | None]:
    async def go():
        events = []
        try:
            async for batch in runner.run(req):
                events += batch
        except Exception as error:  # noqa: BLE001 - returned for the test to inspect
            return events, error
        return events, None

    return asyncio.run(go())


def steps_of(events) -> list[tuple[int, int]]:
    return [(e.step, e.total_steps) for e in events if isinstance(e, RenderProgress) and e.step]


def decoded_frames(uri: str) -> list[np.ndarray]:
    with fsspec.open(uri, "rb") as f, av.open(f) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_a_render_ends_with_done_whose_mp4_decodes_and_whose_manifest_names_the_seed(bench):
    batches: list[list] = []
    events = asyncio.run(collect(bench.runner, request(seed=77), batches))
    done = events[-1]
    assert isinstance(done, Done)
    # Typed all the way: progress, then exactly one Done; stages are the one Stage enum.
    assert all(isinstance(e, RenderProgress) for e in events[:-1])
    assert all(isinstance(e.stage, Stage) for e in events[:-1])
    assert [e.stage for e in events if isinstance(e, RenderProgress) and not e.step][:2] == [
        Stage.ENCODING_PROMPT, Stage.DENOISING]
    assert [e.stage for e in events[-3:-1]] == [Stage.POSTPROCESSING, Stage.WRITING]
    assert steps_of(events) == [(1, 2), (2, 2)]
    assert all(e.node == "here" for e in events if isinstance(e, RenderProgress) and not e.step and e.at)
    assert (done.seed, done.frames, done.device_kind, done.node, done.candidates) == (77, 9, "CPU", "here", None)
    assert all(isinstance(t, PhaseTiming) and isinstance(t.phase, Stage) for t in done.timings)
    assert {Stage.ENCODING_PROMPT, Stage.DENOISING, Stage.DECODING, Stage.POSTPROCESSING, Stage.ENCODING,
            Stage.WRITING} <= {t.phase for t in done.timings}

    frames = decoded_frames(done.artifact_uri)
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    with fsspec.open(done.manifest_uri, "r") as f:
        manifest = json.load(f)
    assert manifest["seed"] == manifest["spec"]["seed"] == 77
    assert (manifest["render_id"], manifest["attempt"]) == ("r-post", 1)
    assert manifest["output"] == {"frames": 9, "height": 64, "width": 64}
    assert [t["phase"] for t in manifest["timings"]] == [t.phase for t in done.timings[:-1]]  # all but writing
    assert bench.runner.postprocessing == set()


def test_candidates_are_rendered_scored_and_the_best_one_delivered(bench):
    events, error = run(bench.runner, request(ResolvedPostprocess(candidates=3, interpolation_factor=2)))
    assert error is None
    done = events[-1]
    assert isinstance(done, Done)
    assert [c["seed"] for c in done.candidates] == [10, 11, 12]
    chosen = [c for c in done.candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["score"] == max(c["score"] for c in done.candidates)
    assert done.seed == chosen[0]["seed"]
    assert set(done.quality) == {"temporal_consistency", "flicker", "motion_smoothness", "frozen", "issues"}
    # Steps count across the candidates, and only go forward.
    assert steps_of(events) == [(step, 6) for step in range(1, 7)]
    phases = {phase for phase, _, _ in done.timings}
    assert {"DENOISING", "POSTPROCESSING", "ENCODING", "WRITING"} <= phases
    with fsspec.open(done.artifact_uri, "rb") as f:
        video = probe_mp4(f.read())
    assert (video["frames"], video["fps"]) == (17, 16.0)
    assert len(decoded_frames(done.artifact_uri)) == 17
    with fsspec.open(done.manifest_uri, "r") as f:
        manifest = json.load(f)
    assert manifest["seed"] == done.seed and manifest["spec"]["seed"] == done.seed
    assert manifest["postprocess"]["output"] == {"frames": 17, "height": 64, "width": 64, "fps": 16}
    assert len(manifest["postprocess"]["candidates"]) == 3
    assert [c["seed"] for c in manifest["postprocess"]["candidates"]] == [10, 11, 12]
    assert len(bench.engine.outcomes) == 3  # one render per candidate, none again for the chosen one


def test_quality_gate_fail_fails_the_render_and_charges_what_ran(bench_for):
    # Random-weight video is noise: any flicker threshold near 0 is crossed.
    bench = bench_for(quality=QualityGate(action="fail", max_flicker=0.01))
    events, error = run(bench.runner, request())
    assert isinstance(error, QualityRejected) and "flicker" in str(error)
    charged = [phase for e in events for phase, _, _ in e.finished_phases]
    assert "POSTPROCESSING" in charged and "ENCODING" in charged
    assert not bench.artifacts.fs.exists(bench.artifacts.attempt_prefix("r-post", 1))  # nothing written


def test_quality_gate_retry_renders_new_seeds_then_gives_up(bench_for):
    bench = bench_for(quality=QualityGate(action="retry", max_flicker=0.01, max_retries=2))
    events, error = run(bench.runner, request(seed=40))
    assert isinstance(error, QualityRejected) and "after 2 retries" in str(error)
    # Three renders (seeds 40, 41, 42): steps 1..6 in order, the total growing with each retry.
    assert [step for step, _ in steps_of(events)] == list(range(1, 7))
    assert steps_of(events)[-1] == (6, 6)
    assert len(bench.engine.outcomes) == 3


def test_quality_gate_retry_delivers_a_clip_that_passes(bench_for):
    bench = bench_for(quality=QualityGate(action="retry", max_flicker=1e9, max_retries=2))
    events, error = run(bench.runner, request())
    assert error is None and isinstance(events[-1], Done) and events[-1].candidates is None


def test_quality_gate_retry_delivers_the_next_seed_when_the_first_fails(bench_for, monkeypatch):
    bench = bench_for(quality=QualityGate(action="retry", max_flicker=0.01, max_retries=2))
    verdicts = iter([["flicker 9 above 0.01"], []])  # the first clip crosses the gate, the second passes
    monkeypatch.setattr(attempt_module, "gate_failures", lambda scores, gate: next(verdicts))
    events, error = run(bench.runner, request(seed=20))
    assert error is None
    done = events[-1]
    assert isinstance(done, Done) and done.seed == 21
    assert steps_of(events) == [(1, 2), (2, 2), (3, 4), (4, 4)]
    # Back into the engine between the two: the stages say so.
    stages = [e.stage for e in events if isinstance(e, RenderProgress) and not e.step]
    assert stages.count(Stage.POSTPROCESSING) >= 3 and stages[-1] == Stage.WRITING
    with fsspec.open(done.manifest_uri, "r") as f:
        manifest = json.load(f)
    assert manifest["seed"] == 21
    assert manifest["postprocess"]["quality_retries"] == [{"seed": 20, "issues": ["flicker 9 above 0.01"]}]
    assert len(decoded_frames(done.artifact_uri)) == 9


def held_attempt(bench: Bench, req: EngineRequest, step: int, while_held):
    """Runs the attempt, held after denoising `step`; once held, calls `while_held(task)`;
    returns the events and the error (None) the attempt ended with."""
    hold = bench.holds.hold_next(step)

    async def go():
        events: list = []

        async def consume():
            async for batch in bench.runner.run(req):
                events.extend(batch)

        task = asyncio.ensure_future(consume())
        assert await asyncio.to_thread(hold.wait_held, HOLD_TIMEOUT_S) == req.render_id
        while_held(task)
        try:
            await task
        except (Exception, asyncio.CancelledError) as error:  # noqa: BLE001 - returned for the test
            return hold, events, error
        return hold, events, None

    return asyncio.run(go())


def test_a_preempted_attempt_leaves_a_checkpoint_a_later_attempt_resumes_to_the_same_frames(bench):
    uninterrupted = asyncio.run(collect(bench.runner, request(num_inference_steps=4, render_id="r-whole")))[-1]
    whole_frames = bench.engine.outcomes[-1].frames

    req = request(num_inference_steps=4)
    hold, events, error = held_attempt(bench, req, 2, lambda task: bench.preemption.request("r-post", 1))
    assert error is None and hold.outcome == "interrupted"
    preempted = events[-1]
    assert isinstance(preempted, Preempted) and not any(isinstance(e, Done) for e in events)
    assert (preempted.step, preempted.total_steps, preempted.node) == (2, 4, "here")
    assert [t.phase for t in preempted.timings] == [Stage.ENCODING_PROMPT, Stage.DENOISING]
    assert Stage.DECODING not in [e.stage for e in events if isinstance(e, RenderProgress)]
    assert bench.preemption.raised == set()  # lowered once the checkpoint is written
    checkpoint = DenoiseCheckpoint.from_bytes(bench.artifacts.read_checkpoint(preempted.checkpoint_uri))
    assert checkpoint.step == 2

    resumed = dataclasses.replace(req, attempt=2, resume_from=preempted.checkpoint_uri)
    events = asyncio.run(collect(bench.runner, resumed))
    done = events[-1]
    assert isinstance(done, Done) and steps_of(events) == [(3, 4), (4, 4)]
    np.testing.assert_array_equal(bench.engine.outcomes[-1].frames, whole_frames)
    assert len(decoded_frames(done.artifact_uri)) == len(decoded_frames(uninterrupted.artifact_uri)) == 9
    with fsspec.open(done.manifest_uri, "r") as f:
        manifest = json.load(f)
    assert manifest["attempt"] == 2 and any("resumed after step 2 of 4" in note for note in manifest["notes"])


def test_a_cancelled_attempt_stops_at_the_step_boundary_and_writes_nothing(bench):
    req = request(num_inference_steps=4, render_id="r-cancel")
    hold, events, error = held_attempt(bench, req, 2, lambda task: task.cancel())
    assert isinstance(error, asyncio.CancelledError) and hold.outcome == "interrupted"
    # The engine returned at the step boundary after step 2, before decoding.
    stopped = bench.engine.outcomes[-1]
    assert isinstance(stopped, RenderCancelled) and stopped.step == 2
    assert [step for step, _ in steps_of(events)] == [1, 2]
    assert Stage.DECODING not in [e.stage for e in events]
    assert not bench.artifacts.fs.exists(bench.artifacts.attempt_prefix("r-cancel", 1))
    assert bench.runner.postprocessing == set()
    # The render thread is free: the next attempt renders.
    assert isinstance(asyncio.run(collect(bench.runner, request(render_id="r-next")))[-1], Done)


def test_the_attempt_imports_no_ray_and_nothing_of_the_planes_above():
    code = ("import sys, farm.render.attempt; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'farm.serve', 'farm.api', "
            "'farm.jobs'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
