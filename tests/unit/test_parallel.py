"""Context parallelism (`farm.engines.parallel`): one render over 2 ranks on the CPU, with
torch.distributed's gloo backend and diffusers' Ulysses attention, on the tiny LTX-Video.

Tolerance: a render over 2 ranks must give the single-process render's frames within
1/255 (one uint8 level); on this machine they are bitwise equal (the all-to-all moves
whole heads, and every rank runs the same float32 code on its rows)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farm.domain.engine import EngineRequest, RenderCancelled, RenderPreempted
from farm.domain.spec import Task
from farm.domain.states import Stage

MODEL = "ltx-video-tiny"
STEPS = 4


def _tiny_model(models_dir: Path):
    from farm.config import tiny_model_configs

    model = next(m for m in tiny_model_configs(models_dir) if m.name == MODEL)
    # One thread a rank: two ranks share the two cores of the test machine.
    return model.model_copy(update={"cpu_threads": 1, "device": "cpu"})


@pytest.fixture(scope="module")
def ltx_dir(tmp_path_factory) -> Path:
    from farm.engines.tiny import make_tiny_models

    directory = tmp_path_factory.mktemp("parallel-models")
    make_tiny_models(directory, families=["ltx-video"])
    return directory


@pytest.fixture(scope="module")
def model(ltx_dir):
    return _tiny_model(ltx_dir)


@pytest.fixture(scope="module")
def single(model):
    from farm.engines.pipeline_engine import DiffusersEngine

    return DiffusersEngine(model)


@pytest.fixture(scope="module")
def parallel(model):
    """Loaded as a replica loads it: a model config with a context_parallel section."""
    from farm.config import ContextParallelConfig
    from farm.engines import load_engine
    from farm.engines.parallel import ParallelEngine

    engine = load_engine(model.model_copy(update={
        "context_parallel": ContextParallelConfig(degree=2, mode="ulysses", timeout_s=60)}))
    assert isinstance(engine, ParallelEngine) and engine.describe()["context_parallel"]["degree"] == 2
    yield engine
    engine.close()


def test_the_config_asks_one_gpu_per_rank_and_the_eager_backend(model):
    from farm.config import ModelConfig

    fields = model.model_dump(exclude={"limits", "defaults"})
    with pytest.raises(ValueError, match="needs one per rank"):
        ModelConfig(**{**fields, "context_parallel": {"degree": 4},
                       "pools": [{"device_kind": "H100", "num_gpus": 2}]})
    with pytest.raises(ValueError, match="eager backend"):
        ModelConfig(**{**fields, "context_parallel": {"degree": 2}, "backend": {"name": "compile"}})
    assert ModelConfig(**{**fields, "context_parallel": {"degree": 2},
                          "pools": [{"device_kind": "H100", "num_gpus": 2}]}).context_parallel.degree == 2


def request(**overrides) -> EngineRequest:
    fields = dict(render_id="r1", attempt=1, task=Task.TEXT_TO_VIDEO, prompt="a red fox running through snow",
                  negative_prompt="", image=None, width=64, height=64, num_frames=9, fps=24,
                  num_inference_steps=STEPS, guidance_scale=3.0, seed=7)
    fields.update(overrides)
    return EngineRequest(**fields)


class Run:
    """Progress log, and a stop or preemption at a chosen step."""

    def __init__(self, stop_after: int | None = None, preempt_after: int | None = None, fail_after: int | None = None):
        self.steps: list[int] = []
        self.stop_after, self.preempt_after, self.fail_after = stop_after, preempt_after, fail_after

    def on_progress(self, progress) -> None:
        if progress.stage == Stage.DENOISING and progress.step:
            self.steps.append(progress.step)
            if self.fail_after is not None and progress.step == self.fail_after:
                raise KeyError("a progress callback that fails")

    def should_stop(self) -> bool:
        return self.stop_after is not None and bool(self.steps) and self.steps[-1] >= self.stop_after

    def should_preempt(self) -> bool:
        return self.preempt_after is not None and bool(self.steps) and self.steps[-1] >= self.preempt_after


def test_a_render_over_two_ranks_equals_the_single_process_render(single, parallel):
    expected = single.render(request(), lambda p: None, lambda: False)
    run = Run()
    output = parallel.render(request(), run.on_progress, run.should_stop)
    assert output.frames.shape == expected.frames.shape == (9, 64, 64, 3)
    difference = np.abs(output.frames.astype(int) - expected.frames.astype(int)).max()
    assert difference <= 1, f"frames differ by {difference} levels"
    assert run.steps == list(range(1, STEPS + 1))
    assert parallel.last_endings == [("denoised", STEPS), ("denoised", STEPS)]
    assert any("context parallel (ulysses) over 2" in note for note in output.notes)
    # Another seed is another video: the comparison above can fail.
    other = parallel.render(request(seed=8), lambda p: None, lambda: False)
    assert np.abs(other.frames.astype(int) - expected.frames.astype(int)).max() > 1


def test_image_to_video_over_two_ranks_equals_the_single_process_render(single, parallel):
    """LTX-Video's image-to-video passes a timestep per token, which farm's plan splits."""
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image, "PNG")
    i2v = request(task=Task.IMAGE_TO_VIDEO, image=image.getvalue())
    expected = single.render(i2v, lambda p: None, lambda: False)
    output = parallel.render(i2v, lambda p: None, lambda: False)
    assert np.abs(output.frames.astype(int) - expected.frames.astype(int)).max() <= 1


def test_a_render_whose_tokens_do_not_split_is_refused_and_the_group_goes_on(parallel):
    # 96 x 96 x 1 frames: 1 x 3 x 3 = 9 latent tokens, not divisible by 2.
    with pytest.raises(ValueError, match="not divisible by 2"):
        parallel.render(request(width=96, height=96, num_frames=1), lambda p: None, lambda: False)
    assert parallel.last_endings == [("failed", "AssertionError")] * 2
    assert parallel.broken is None


def test_a_cancel_stops_every_rank_at_the_same_step(parallel):
    run = Run(stop_after=2)
    with pytest.raises(RenderCancelled) as cancelled:
        parallel.render(request(), run.on_progress, run.should_stop)
    assert cancelled.value.step == 2
    assert run.steps == [1, 2]
    assert parallel.last_endings == [("cancelled", 2), ("cancelled", 2)]
    assert parallel.broken is None
    # The group goes on: the next render runs on both ranks.
    parallel.render(request(num_inference_steps=2), lambda p: None, lambda: False)
    assert parallel.last_endings == [("denoised", 2), ("denoised", 2)]


def test_a_preemption_checkpoints_every_rank_and_the_resume_equals_the_whole_render(single, parallel):
    assert parallel.supports_checkpoint, parallel.checkpoint_unsupported
    run = Run(preempt_after=2)
    with pytest.raises(RenderPreempted) as preempted:
        parallel.render(request(), run.on_progress, run.should_stop, should_preempt=run.should_preempt)
    assert parallel.last_endings == [("preempted", 2), ("preempted", 2)]
    checkpoint = preempted.value.checkpoint
    assert checkpoint.step == 2
    resumed = parallel.render(request(), lambda p: None, lambda: False, resume=checkpoint)
    whole = single.render(request(), lambda p: None, lambda: False)
    assert np.abs(resumed.frames.astype(int) - whole.frames.astype(int)).max() <= 1


def test_a_failing_progress_callback_stops_every_rank_and_is_raised(parallel):
    run = Run(fail_after=1)
    with pytest.raises(KeyError, match="fails"):
        parallel.render(request(), run.on_progress, run.should_stop)
    assert parallel.last_endings == [("cancelled", 1), ("cancelled", 1)]
    assert parallel.broken is None
    parallel.check_health()


def test_ring_and_cached_backends_are_refused_with_the_reason(model):
    from farm.engines.parallel import ParallelEngine

    with pytest.raises(ValueError, match="log-sum-exp"):
        ParallelEngine(model, degree=2, mode="ring")
    cached = model.model_copy(update={"backend": model.backend.model_copy(update={"first_block_cache_threshold": 0.1})})
    with pytest.raises(ValueError, match="eager backend without First-Block Cache"):
        ParallelEngine(cached, degree=2)


def test_ring_is_refused_for_a_transformer_that_splits_an_attention_mask(single):
    from farm.engines.parallel import context_parallel_unsupported

    transformer = single.denoiser(single.pipeline(Task.TEXT_TO_VIDEO))
    reason = context_parallel_unsupported(transformer, 2, "ring", torch.device("cuda"))
    assert "encoder_attention_mask" in reason
    assert "not divisible" in context_parallel_unsupported(transformer, 3, "ulysses", torch.device("cpu"))
    assert context_parallel_unsupported(transformer, 2, "ulysses", torch.device("cpu")) is None


def _gone(pid: int) -> bool:
    """No such process, or a zombie no one has reaped yet (it runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _wait_until_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if not _gone(pid)]


def test_close_joins_the_workers(parallel):
    """Last of the tests of the module's engine: it closes it."""
    pids = parallel.worker_pids
    assert pids and not any(_gone(pid) for pid in pids)
    parallel.close()
    assert all(_gone(pid) for pid in pids)
    assert all(not worker.alive() for worker in parallel._workers)
    with pytest.raises(RuntimeError, match="closed"):
        parallel.render(request(), lambda p: None, lambda: False)
    parallel.close()  # again: nothing to do


def test_a_worker_goes_when_its_owner_is_killed(model):
    """The owner starts a rank-1 worker the way `ParallelEngine` does, waits until it has
    loaded the model (it then blocks in the process group's rendezvous, where no rank 0
    will come), and is killed: the worker must exit on its own. (The owner imports no
    torch: a cheap stand-in for a replica.)"""
    script = textwrap.dedent(f"""
        import os, sys, time
        from farm.engines.parallel import _Worker, _free_port
        worker = _Worker(1, (1, 2, {model.model_dump_json()!r}, "cpu", "ulysses", None,
                             f"tcp://127.0.0.1:{{_free_port()}}", 120.0, os.getpid()))
        worker.expect("loaded", time.monotonic() + 120)
        print(worker.process.pid, flush=True)
        sys.stdin.read()
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).parents[2], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        line = owner.stdout.readline()
        assert line, f"the owner exited with {owner.wait()} before its worker loaded"
        pid = int(line)
        assert not _gone(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert _wait_until_gone([pid], 20) == []
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
