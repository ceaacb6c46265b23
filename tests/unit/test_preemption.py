"""Preemption on the engine side: a render stopped at a denoising step boundary leaves a
checkpoint, and a render resumed from it equals the uninterrupted one bitwise (CPU,
float32); checkpoints of another spec are refused; the artifact store keeps them whole; a
render attempt, with the Serve replica's flags and holds, writes the checkpoint and resumes
from it."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import shutil
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from farm.config import Task
from farm.domain.engine import (
    CheckpointError,
    DenoiseCheckpoint,
    EngineRequest,
    RenderCancelled,
    RenderPreempted,
)
from farm.domain.states import Stage
from farm.engines import load_engine
from farm.engines.pipeline_engine import DiffusersEngine
from farm.engines.tiny import tiny_model_configs
from farm.families import FAMILY_MODULES, family_module
from farm.storage.artifacts import ArtifactStore
from tests.holds import wait_held
from tests.unit.conftest import FAMILIES_AND_TASKS

STEPS = 4
# The tiny models whose pipelines cannot resume exactly, and what their engine says why.
NOT_PREEMPTIBLE = {"ltx-2-tiny": "is not a pipeline whose loop farm can resume"}
PREEMPTIBLE = [(name, task) for name, task in FAMILIES_AND_TASKS if name not in NOT_PREEMPTIBLE]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_request(engine: DiffusersEngine, task: Task, **overrides) -> EngineRequest:
    fields = dict(
        render_id="r-1", attempt=1, task=task, prompt="a red fox running through a snowy forest",
        negative_prompt="blurry", image=png(0) if task == Task.IMAGE_TO_VIDEO else None,
        width=64, height=64, num_frames=9, fps=engine.model.defaults.fps,
        num_inference_steps=STEPS, guidance_scale=3.0, seed=1234,
    )
    fields.update(overrides)
    return EngineRequest(**fields)


class Run:
    """Progress events of one render, and a preemption check that fires after a chosen step."""

    def __init__(self, preempt_after: int | None = None):
        self.events = []
        self.preempt_after = preempt_after
        self.preempt_checks: list[int] = []  # the step after which the engine asked

    def on_progress(self, progress) -> None:
        self.events.append(progress)

    def last_step(self) -> int:
        return max((e.step for e in self.events if e.stage == Stage.DENOISING), default=0)

    def should_preempt(self) -> bool:
        self.preempt_checks.append(self.last_step())
        return self.preempt_after is not None and self.last_step() >= self.preempt_after

    def steps(self) -> list[int]:
        return [e.step for e in self.events if e.stage == Stage.DENOISING and e.step > 0]

    def stages(self) -> list[str]:
        return [e.stage for e in self.events if e.step == 0]


@pytest.fixture
def decoded_latents(engines, monkeypatch) -> list[torch.Tensor]:
    """The denoised latents every render hands to its family's decode, in order."""
    seen: list[torch.Tensor] = []
    for family in (family_module(f) for f in FAMILY_MODULES):
        original = family.decode_latents  # a family's decode_output decodes through it too

        def recording(pipe, latents, request, generator, original=original):
            seen.append(latents.detach().clone())
            return original(pipe, latents, request, generator)

        monkeypatch.setattr(family, "decode_latents", recording)
    return seen


def never() -> bool:
    return False


def preempt(engine: DiffusersEngine, request: EngineRequest, after: int, resume=None) -> RenderPreempted:
    run = Run(preempt_after=after)
    with pytest.raises(RenderPreempted) as preempted:
        engine.render(request, run.on_progress, never, should_preempt=run.should_preempt, resume=resume)
    return preempted.value


# Preempt and resume -----------------------------------------------------------------------


@pytest.mark.parametrize("model_name, task", PREEMPTIBLE)
def test_preempted_render_resumes_to_the_uninterrupted_frames_bitwise(engines, decoded_latents, model_name, task):
    engine = engines[model_name]
    request = make_request(engine, task)
    uninterrupted = engine.render(request, lambda p: None, never)
    assert len(decoded_latents) == 1

    run = Run(preempt_after=2)
    with pytest.raises(RenderPreempted) as raised:
        engine.render(request, run.on_progress, never, should_preempt=run.should_preempt)
    preempted = raised.value
    assert preempted.step == 2 and preempted.checkpoint.step == 2 and preempted.checkpoint.total_steps == STEPS
    assert run.steps() == [1, 2] and run.stages() == [Stage.ENCODING_PROMPT, Stage.DENOISING]
    assert len(decoded_latents) == 1  # nothing decoded
    assert [t.phase for t in preempted.timings] == [Stage.ENCODING_PROMPT, Stage.DENOISING]
    assert all(t.seconds > 0 and t.device_kind == "CPU" for t in preempted.timings)

    data = preempted.checkpoint.to_bytes()
    checkpoint = DenoiseCheckpoint.from_bytes(data)
    assert checkpoint.step == 2 and checkpoint.fingerprint == preempted.checkpoint.fingerprint
    assert torch.equal(checkpoint.latents, preempted.checkpoint.latents)
    # Half-way latents are not the final ones: the resume has real work left.
    assert not torch.equal(checkpoint.latents, decoded_latents[0].cpu())

    resumed_run = Run()
    resumed = engine.render(request, resumed_run.on_progress, never, resume=checkpoint)
    assert resumed_run.steps() == [3, 4]
    assert all(e.total_steps == STEPS for e in resumed_run.events if e.stage == Stage.DENOISING)
    assert resumed_run.stages() == [Stage.ENCODING_PROMPT, Stage.DENOISING, Stage.DECODING]
    assert torch.equal(decoded_latents[1], decoded_latents[0])  # bitwise, not just close
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)
    assert any("resumed after step 2 of 4" in note for note in resumed.notes)
    assert [t.phase for t in resumed.timings] == [Stage.ENCODING_PROMPT, Stage.DENOISING, Stage.DECODING]


@pytest.mark.parametrize("model_name, task", PREEMPTIBLE)
def test_preempted_in_the_middle_of_a_step_resumes_from_the_step_before_bitwise(engines, decoded_latents,
                                                                              model_name, task):
    engine = engines[model_name]
    request = make_request(engine, task)
    uninterrupted = engine.render(request, lambda p: None, never)

    run = Run()
    asked: list[int] = []

    def yes_from_the_second_question() -> bool:
        # The first question comes after step 1; the second from inside step 2's transformer.
        asked.append(run.last_step())
        return len(asked) >= 2

    with pytest.raises(RenderPreempted) as raised:
        engine.render(request, run.on_progress, never, should_preempt=yes_from_the_second_question)
    preempted = raised.value
    assert asked == [1, 1] and run.steps() == [1]  # step 2 was left unfinished
    assert preempted.step == 1 and preempted.checkpoint.step == 1
    assert [t.phase for t in preempted.timings] == [Stage.ENCODING_PROMPT, Stage.DENOISING]
    assert len(decoded_latents) == 1  # nothing decoded

    resumed_run = Run()
    resumed = engine.render(request, resumed_run.on_progress, never,
                            resume=DenoiseCheckpoint.from_bytes(preempted.checkpoint.to_bytes()))
    assert resumed_run.steps() == [2, 3, 4]
    assert torch.equal(decoded_latents[1], decoded_latents[0])
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)
    # The layers are checked only during the call: a later render runs without the hooks.
    layers = engine._preemption_points(engine.denoiser(engine.pipeline(task)))
    assert layers and all(not layer._forward_pre_hooks for layer in layers)


@pytest.mark.parametrize("model_name", ["ltx-video-tiny", "cogvideox-tiny"])
def test_resumed_render_can_be_preempted_again(engines, decoded_latents, model_name):
    # CogVideoX's DPM scheduler carries the previous x0 prediction: the second checkpoint
    # must take it from the resumed run, the first resume after step 1 from the first step.
    engine = engines[model_name]
    request = make_request(engine, Task.TEXT_TO_VIDEO, num_inference_steps=5)
    uninterrupted = engine.render(request, lambda p: None, never)

    first = preempt(engine, request, after=1)
    second = preempt(engine, request, after=3, resume=DenoiseCheckpoint.from_bytes(first.checkpoint.to_bytes()))
    assert (first.step, second.step) == (1, 3)

    run = Run()
    resumed = engine.render(request, run.on_progress, never, resume=DenoiseCheckpoint.from_bytes(
        second.checkpoint.to_bytes()))
    assert run.steps() == [4, 5]
    assert torch.equal(decoded_latents[-1], decoded_latents[0])
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)


def test_the_last_step_is_never_a_preemption_point(engines, decoded_latents):
    engine = engines["ltx-video-tiny"]
    request = make_request(engine, Task.TEXT_TO_VIDEO)
    run = Run(preempt_after=STEPS)  # says yes only once all steps are done
    output = engine.render(request, run.on_progress, never, should_preempt=run.should_preempt)
    assert output.frames.shape == (9, 64, 64, 3)
    # Asked after steps 1..N-1 and between the layers of steps 2..N, never after N.
    assert sorted(set(run.preempt_checks)) == [1, 2, 3] and run.preempt_checks.count(3) > 1
    assert run.stages() == [Stage.ENCODING_PROMPT, Stage.DENOISING, Stage.DECODING]

    checkpoint = preempt(engine, request, after=1).checkpoint
    for step in (0, STEPS):
        with pytest.raises(CheckpointError, match="between steps"):
            dataclasses.replace(checkpoint, step=step)


def test_cancel_wins_over_preempt(engines):
    engine = engines["ltx-video-tiny"]
    run = Run(preempt_after=1)
    with pytest.raises(RenderCancelled) as cancelled:
        engine.render(make_request(engine, Task.TEXT_TO_VIDEO), run.on_progress,
                      lambda: run.last_step() >= 1, should_preempt=run.should_preempt)
    assert cancelled.value.step == 1


# Refusals ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ltx_checkpoint(engines) -> DenoiseCheckpoint:
    engine = engines["ltx-video-tiny"]
    return preempt(engine, make_request(engine, Task.IMAGE_TO_VIDEO), after=2).checkpoint


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(seed=1235), "seed"),
        (dict(prompt="a blue bird"), "prompt"),
        (dict(num_inference_steps=STEPS + 2), "num_inference_steps"),
        (dict(image=png(1)), "image_sha256"),
        (dict(width=96), "width"),
        (dict(task=Task.TEXT_TO_VIDEO, image=None), "task"),
    ],
)
def test_checkpoint_of_another_spec_is_refused_before_any_work(engines, ltx_checkpoint, overrides, field):
    engine = engines["ltx-video-tiny"]
    run = Run()
    fields = dict(task=Task.IMAGE_TO_VIDEO)
    fields.update(overrides)
    with pytest.raises(CheckpointError, match=f"another render spec: .*{field}: checkpoint"):
        engine.render(make_request(engine, **fields), run.on_progress, never, resume=ltx_checkpoint)
    assert run.events == []


def test_checkpoint_is_not_tied_to_the_render_id_or_attempt(engines, ltx_checkpoint):
    engine = engines["ltx-video-tiny"]
    request = make_request(engine, Task.IMAGE_TO_VIDEO, render_id="r-1", attempt=2)
    run = Run()
    engine.render(request, run.on_progress, never, resume=ltx_checkpoint)
    assert run.steps() == [3, 4]


def test_checkpoint_of_another_model_is_refused(engines, ltx_checkpoint):
    engine = engines["cogvideox-tiny"]
    request = make_request(engine, Task.IMAGE_TO_VIDEO, fps=engines["ltx-video-tiny"].model.defaults.fps)
    with pytest.raises(CheckpointError, match="weights_sha256"):
        engine.render(request, lambda p: None, never, resume=ltx_checkpoint)


def test_checkpoint_with_another_schedule_or_generator_is_refused(engines, ltx_checkpoint):
    engine = engines["ltx-video-tiny"]
    request = make_request(engine, Task.IMAGE_TO_VIDEO)
    state = dict(ltx_checkpoint.scheduler_state)
    state["sigmas"] = state["sigmas"] * 1.001
    other_schedule = dataclasses.replace(ltx_checkpoint, scheduler_state=state)
    with pytest.raises(CheckpointError, match="sigmas .* differ"):
        engine.render(request, lambda p: None, never, resume=other_schedule)
    cuda_generator = dataclasses.replace(ltx_checkpoint, generator_device="cuda")
    with pytest.raises(CheckpointError, match="cuda generator"):
        engine.render(request, lambda p: None, never, resume=cuda_generator)


def test_unreadable_checkpoint_bytes_are_refused(ltx_checkpoint):
    with pytest.raises(CheckpointError, match="not a readable"):
        DenoiseCheckpoint.from_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        DenoiseCheckpoint.from_bytes(ltx_checkpoint.to_bytes()[:-100])  # truncated
    buffer = io.BytesIO()
    torch.save({"format": "something-else/1"}, buffer)
    with pytest.raises(CheckpointError, match="something-else"):
        DenoiseCheckpoint.from_bytes(buffer.getvalue())



@pytest.fixture
def torch_threads():
    """The engine sets torch's thread count in the thread that renders (here, the test's):
    put it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_resume_keeps_the_cpu_threads_its_checkpoint_was_made_with(engines, torch_threads):
    engine = engines["ltx-video-tiny"]
    request = make_request(engine, Task.TEXT_TO_VIDEO)
    uninterrupted = engine.render(request, lambda p: None, never, cpu_threads=1)
    assert uninterrupted.cpu_threads == 1 and torch.get_num_threads() == 1
    assert engine.render(request, lambda p: None, never).cpu_threads == engine.cpu_threads  # the model's

    run = Run(preempt_after=2)
    with pytest.raises(RenderPreempted) as raised:
        engine.render(request, run.on_progress, never, should_preempt=run.should_preempt, cpu_threads=1)
    checkpoint = DenoiseCheckpoint.from_bytes(raised.value.checkpoint.to_bytes())
    assert checkpoint.cpu_threads == 1

    # Asked for two threads, the resume runs on the one its first steps ran on.
    resumed = engine.render(request, lambda p: None, never, resume=checkpoint, cpu_threads=2)
    assert resumed.cpu_threads == 1
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)


def test_a_checkpoint_without_a_thread_count_still_resumes(engines, ltx_checkpoint, torch_threads):
    """Checkpoints written before thread counts were recorded load, and resume on the
    threads asked for."""
    payload = torch.load(io.BytesIO(ltx_checkpoint.to_bytes()), weights_only=True)
    del payload["cpu_threads"]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    checkpoint = DenoiseCheckpoint.from_bytes(buffer.getvalue())
    assert checkpoint.cpu_threads is None and checkpoint.step == ltx_checkpoint.step
    engine = engines["ltx-video-tiny"]
    resumed = engine.render(make_request(engine, Task.IMAGE_TO_VIDEO), lambda p: None, never, resume=checkpoint,
                            cpu_threads=1)
    assert resumed.cpu_threads == 1


# Schedulers -------------------------------------------------------------------------------


def copy_with_scheduler(models_dir: Path, tmp_path: Path, directory: str, **changes) -> Path:
    """A copy of a tiny model whose scheduler config (and class, with `_class_name`) is changed."""
    target = tmp_path / directory
    shutil.copytree(models_dir / directory, target)
    config_path = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    if "_class_name" in changes:
        index_path = target / "model_index.json"
        index = json.loads(index_path.read_text())
        index["scheduler"][1] = changes["_class_name"]
        index_path.write_text(json.dumps(index))
    return target


def test_cogvideox_with_the_ddim_scheduler_resumes_bitwise(models_dir, tmp_path):
    source = copy_with_scheduler(models_dir, tmp_path, "cogvideox-tiny", _class_name="CogVideoXDDIMScheduler")
    model = next(m for m in tiny_model_configs(models_dir) if m.name == "cogvideox-tiny")
    model = model.model_copy(update={"sources": {Task.TEXT_TO_VIDEO: str(source)}})
    engine = load_engine(model)
    assert type(engine.pipeline(Task.TEXT_TO_VIDEO).scheduler).__name__ == "CogVideoXDDIMScheduler"
    assert engine.supports_checkpoint
    request = make_request(engine, Task.TEXT_TO_VIDEO)
    uninterrupted = engine.render(request, lambda p: None, never)
    checkpoint = preempt(engine, request, after=3).checkpoint
    resumed = engine.render(request, lambda p: None, never, resume=DenoiseCheckpoint.from_bytes(checkpoint.to_bytes()))
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)


def test_engine_that_cannot_checkpoint_says_so_and_never_preempts(models_dir, tmp_path, ltx_checkpoint):
    # Stochastic sampling draws from torch's global generator, which no checkpoint holds.
    source = copy_with_scheduler(models_dir, tmp_path, "ltx-video-tiny", stochastic_sampling=True)
    model = next(m for m in tiny_model_configs(models_dir) if m.name == "ltx-video-tiny")
    model = model.model_copy(update={"sources": {task: str(source) for task in model.sources}})
    engine = load_engine(model)
    assert engine.supports_checkpoint is False
    description = engine.describe()
    assert description["preemptible"] is False
    assert "stochastic_sampling" in description["checkpoint"]["unsupported_reason"]

    run = Run(preempt_after=1)
    output = engine.render(make_request(engine, Task.TEXT_TO_VIDEO), run.on_progress, never,
                           should_preempt=run.should_preempt)
    assert output.frames.shape == (9, 64, 64, 3) and run.preempt_checks == []
    with pytest.raises(CheckpointError, match="cannot resume"):
        engine.render(make_request(engine, Task.IMAGE_TO_VIDEO), lambda p: None, never, resume=ltx_checkpoint)


@pytest.mark.parametrize("model_name", sorted({name for name, _ in FAMILIES_AND_TASKS}))
def test_engines_say_whether_they_are_preemptible_and_why_not(engines, model_name):
    engine = engines[model_name]
    description = engine.describe()
    if model_name in NOT_PREEMPTIBLE:
        assert engine.supports_checkpoint is False and description["preemptible"] is False
        assert NOT_PREEMPTIBLE[model_name] in description["checkpoint"]["unsupported_reason"]
        run = Run(preempt_after=1)
        engine.render(make_request(engine, next(iter(engine.pipelines))), run.on_progress, never,
                      should_preempt=run.should_preempt)
        assert run.preempt_checks == []  # never asked, so never stopped
    else:
        assert engine.supports_checkpoint is True
        assert description["preemptible"] is True
        assert description["checkpoint"]["resume"] == "bitwise"


def test_scheduler_is_left_unwrapped_after_a_preempted_call(engines):
    engine = engines["ltx-video-tiny"]
    scheduler = engine.pipeline(Task.TEXT_TO_VIDEO).scheduler
    preempt(engine, make_request(engine, Task.TEXT_TO_VIDEO), after=1)
    assert "step" not in vars(scheduler) and "set_timesteps" not in vars(scheduler)



# Artifact store ---------------------------------------------------------------------------


@pytest.fixture(params=["file", "memory"])
def artifact_store(request, tmp_path) -> ArtifactStore:
    if request.param == "file":
        return ArtifactStore(str(tmp_path / "artifacts"))
    return ArtifactStore(f"memory://farm-test-{tmp_path.name}")


def test_checkpoint_round_trips_through_the_artifact_store(artifact_store, ltx_checkpoint):
    data = ltx_checkpoint.to_bytes()
    uri = artifact_store.write_checkpoint("r-9", 2, data)
    assert "r-9" in uri and "attempt-2" in uri
    assert artifact_store.read_checkpoint(uri) == data
    restored = DenoiseCheckpoint.from_bytes(artifact_store.read_checkpoint(uri))
    assert torch.equal(restored.latents, ltx_checkpoint.latents) and restored.step == ltx_checkpoint.step
    # No temporary file is left beside it.
    assert artifact_store.fs.ls(artifact_store.checkpoint_prefix("r-9"), detail=False) == [
        artifact_store.fs._strip_protocol(uri)
    ]

    # Another attempt's checkpoint lives beside it; deleting the attempt's files keeps both.
    other = artifact_store.write_checkpoint("r-9", 3, b"later")
    artifact_store.delete_attempt("r-9", 2)
    assert artifact_store.read_checkpoint(uri) == data and artifact_store.read_checkpoint(other) == b"later"

    artifact_store.delete_checkpoints("r-9")
    for gone in (uri, other):
        with pytest.raises(FileNotFoundError):
            artifact_store.read_checkpoint(gone)
    artifact_store.delete_checkpoints("r-9")  # nothing left: no error


def test_a_failed_checkpoint_write_leaves_no_checkpoint(artifact_store, monkeypatch):
    def failing_move(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact_store.fs, "mv", failing_move)
    with pytest.raises(OSError, match="disk full"):
        artifact_store.write_checkpoint("r-8", 1, b"x" * 1000)
    assert artifact_store.fs.ls(artifact_store.checkpoint_prefix("r-8"), detail=False) == []


# One render attempt (farm.render.attempt), with the replica's flags ---------------------------


@pytest.fixture
def attempts(engines, tmp_path, monkeypatch):
    """Render attempts on the tiny LTX-Video, with the Serve replica's preemption flags and
    drill holds, their key-value store in memory (Ray's is not running here)."""
    from farm.postproc.pipeline import LocalChunkRunner
    from farm.render.attempt import AttemptRunner
    from farm.serve import flags

    monkeypatch.setattr(flags, "kv", flags.MemoryKV())
    runner = AttemptRunner(engines["ltx-video-tiny"], LocalChunkRunner(workers=1),
                           ArtifactStore(str(tmp_path / "artifacts")), flags.KVPreemption())
    yield runner
    runner.render_thread.executor.shutdown(wait=True)


def stream(runner, request: EngineRequest) -> list:
    async def collect():
        return [event async for batch in runner.run(request) for event in batch]

    return asyncio.run(collect())


def render_thread(runner, request: EngineRequest, stop: threading.Event, messages: list) -> None:
    """The render thread's part of an attempt alone, its messages appended to `messages`."""
    runner.render_thread.render(request, lambda message, flush=False: messages.append(message), stop)


def rendered_candidate(runner, request: EngineRequest):
    """The render thread's part alone: its progress events and the engine's output."""
    from farm.domain.engine import Candidate
    from farm.render.render_thread import Rendered

    messages = []
    render_thread(runner, request, threading.Event(), messages)
    assert isinstance(messages[-1], Rendered) and any(isinstance(m, Candidate) for m in messages), messages
    return messages, next(m.output for m in messages if isinstance(m, Candidate))


def steps_of(messages: list) -> list[int]:
    from farm.domain.events import RenderProgress

    return [m.step for m in messages if isinstance(m, RenderProgress) and m.step]


def test_attempt_preempts_writes_the_checkpoint_and_resumes_from_it(attempts):
    from farm.domain.events import Done, Preempted, RenderProgress
    from farm.serve import flags

    request = make_request(attempts.engine, Task.TEXT_TO_VIDEO, render_id="r-s")
    _, uninterrupted = rendered_candidate(attempts, request)

    flags.request_preemption("r-s", 1)
    events = stream(attempts, request)
    assert [type(e) for e in events if not isinstance(e, RenderProgress)] == [Preempted]  # no Done, no error
    preempted = events[-1]
    assert {f.name for f in dataclasses.fields(preempted)} == {
        "checkpoint_uri", "step", "total_steps", "timings", "checkpoint_seconds", "device_kind", "node"}
    assert (preempted.step, preempted.total_steps) == (1, STEPS)  # the flag was up from the start
    assert [phase for phase, _, _ in preempted.timings] == [Stage.ENCODING_PROMPT, Stage.DENOISING]
    assert preempted.checkpoint_seconds > 0 and preempted.device_kind == "CPU"
    assert not flags.preemption_requested("r-s", 1)  # lowered once the checkpoint is written
    assert Stage.DECODING not in [e.stage for e in events if isinstance(e, RenderProgress)]
    checkpoint = DenoiseCheckpoint.from_bytes(attempts.artifacts.read_checkpoint(preempted.checkpoint_uri))
    assert checkpoint.step == 1

    resumed_request = dataclasses.replace(request, attempt=2, resume_from=preempted.checkpoint_uri)
    progress, resumed = rendered_candidate(attempts, resumed_request)
    assert steps_of(progress) == [2, 3, 4]
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)

    # The whole stream: post-processed, written, and the manifest says where it resumed.
    events = stream(attempts, resumed_request)
    done = events[-1]
    assert isinstance(done, Done)
    with fsspec.open(done.manifest_uri, "rb") as f:
        manifest = json.load(f)
    assert any("resumed after step 1 of 4" in note for note in manifest["notes"])


@pytest.fixture
def held_attempts(attempts, monkeypatch):
    """Attempts taking the replica's drill holds (in the same in-memory store)."""
    from farm.serve.flags import RenderHolds

    monkeypatch.setattr(attempts.render_thread, "holds", RenderHolds("ltx-video-tiny", None, "here"))
    return attempts


def start_held(runner, request: EngineRequest, step: int, stop: threading.Event):
    """The render thread's part of `request` in a thread of its own, held after `step`;
    returns once it waits there."""
    from farm.serve.flags import hold_next_render

    hold_next_render("ltx-video-tiny", step)
    messages: list = []
    thread = threading.Thread(target=render_thread, args=(runner, request, stop, messages))
    thread.start()
    holder, record = wait_held(timeout=120)
    assert (holder, record["step"]) == (request.render_id, step)
    return thread, messages


def test_a_held_render_waits_after_its_step_until_released(held_attempts):
    from farm.render.render_thread import Rendered
    from farm.serve.flags import held, release

    request = make_request(held_attempts.engine, Task.TEXT_TO_VIDEO, render_id="r-held")
    thread, messages = start_held(held_attempts, request, 2, threading.Event())
    assert thread.is_alive() and steps_of(messages) == [1, 2]  # nothing past the held step
    release("r-held")
    thread.join(timeout=120)
    assert steps_of(messages) == [1, 2, 3, 4] and isinstance(messages[-1], Rendered)
    assert held() == {}
    # A hold is taken once: the next render runs through.
    again: list = []
    render_thread(held_attempts, dataclasses.replace(request, render_id="r-next"), threading.Event(), again)
    assert steps_of(again) == [1, 2, 3, 4]


def test_a_cancel_ends_a_hold_and_the_render_stops_at_the_held_step(held_attempts):
    from farm.render.render_thread import Failed

    stop = threading.Event()
    request = make_request(held_attempts.engine, Task.TEXT_TO_VIDEO, render_id="r-cancel")
    thread, messages = start_held(held_attempts, request, 2, stop)
    stop.set()
    thread.join(timeout=120)
    assert isinstance(messages[-1], Failed) and isinstance(messages[-1].error, RenderCancelled)
    assert messages[-1].error.step == 2


def test_a_preemption_ends_a_hold_and_checkpoints_right_after_the_held_step(held_attempts):
    from farm.domain.events import Preempted
    from farm.serve.flags import request_preemption

    request = make_request(held_attempts.engine, Task.TEXT_TO_VIDEO, render_id="r-pre")
    thread, messages = start_held(held_attempts, request, 2, threading.Event())
    request_preemption("r-pre", 1)
    thread.join(timeout=120)
    preempted = next(m for m in messages if isinstance(m, Preempted))
    assert (preempted.step, preempted.total_steps) == (2, STEPS)


def test_attempt_renders_from_step_zero_when_the_checkpoint_is_unusable(attempts, tmp_path):
    request = make_request(attempts.engine, Task.TEXT_TO_VIDEO, render_id="r-u", attempt=2,
                           resume_from=str(tmp_path / "artifacts" / "gone.ckpt"))
    progress, output = rendered_candidate(attempts, request)
    assert steps_of(progress) == [1, 2, 3, 4]
    assert any("was not used" in note and "step 0" in note for note in output.notes)


def test_a_render_started_beside_post_processing_leaves_it_the_cores(attempts, torch_threads, monkeypatch):
    """While a render of the replica is being post-processed (its chunks on the same cores),
    the next one renders on the engine's threads less post-processing's; alone, on all of them."""
    from farm.config import PostprocConfig
    from farm.domain.events import Done
    from farm.serve.render_replica import threads_beside_postprocessing

    engine = attempts.engine
    monkeypatch.setattr(engine, "cpu_threads", 3)
    beside_threads = threads_beside_postprocessing(engine, engine.model, PostprocConfig(replicas=1, num_cpus=1))
    assert beside_threads == 2  # 3 - one post-processing replica of one thread
    monkeypatch.setattr(attempts.render_thread, "threads_beside_postprocessing", beside_threads)
    _, alone = rendered_candidate(attempts, make_request(engine, Task.TEXT_TO_VIDEO, render_id="r-a"))
    assert alone.cpu_threads == 3
    assert attempts.postprocessing == {"r-a"}  # handed over, and counted before the next render starts

    _, beside = rendered_candidate(attempts, make_request(engine, Task.TEXT_TO_VIDEO, render_id="r-b"))
    assert beside.cpu_threads == 2
    configured_model = engine.model.model_copy(update={"cpu_threads_beside_postprocessing": 1})
    monkeypatch.setattr(attempts.render_thread, "threads_beside_postprocessing",
                        threads_beside_postprocessing(engine, configured_model, PostprocConfig(replicas=1, num_cpus=1)))
    _, configured = rendered_candidate(attempts, make_request(engine, Task.TEXT_TO_VIDEO, render_id="r-c"))
    assert configured.cpu_threads == 1

    # A whole render, from the engine to the MP4: post-processed, it no longer counts, and
    # its manifest says how many threads it ran on.
    attempts.postprocessing.clear()
    done = stream(attempts, make_request(engine, Task.TEXT_TO_VIDEO, render_id="r-d"))[-1]
    assert isinstance(done, Done) and attempts.postprocessing == set()
    with fsspec.open(done.manifest_uri, "rb") as f:
        assert json.load(f)["cpu_threads"] == 3
