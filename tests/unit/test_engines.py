"""The engine layer on the tiny random-weight models: loading, rendering, progress,
cancellation, phase timings, and equality with the diffusers pipelines' own output."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, LTXPipeline
from PIL import Image

from farm.config import ModelConfig, Task
from farm.domain.engine import (
    EngineRequest,
    RenderCancelled,
)
from farm.domain.states import Stage
from farm.engines import load_engine
from farm.engines.pipeline_engine import (
    DiffusersEngine,
    frames_to_uint8,
    video_to_uint8_frames,
)
from farm.engines.tiny import make_tiny_models, tiny_model_configs
from farm.families import Family, family_facts, tiny_models
from tests.unit.conftest import FAMILIES_AND_TASKS

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_request(engine: DiffusersEngine, task: Task, image: bytes | None, **overrides) -> EngineRequest:
    """A request at the model's defaults, with any field overridden."""
    defaults = engine.model.defaults
    fields = dict(
        render_id="r-1",
        attempt=1,
        task=task,
        prompt="a red fox running through a snowy forest, cinematic",
        negative_prompt="blurry",
        image=image if task == Task.IMAGE_TO_VIDEO else None,
        width=defaults.width,
        height=defaults.height,
        num_frames=defaults.num_frames,
        fps=defaults.fps,
        num_inference_steps=defaults.num_inference_steps,
        guidance_scale=defaults.guidance_scale,
        seed=1234,
    )
    fields.update(overrides)
    return EngineRequest(**fields)


def small_request(engine: DiffusersEngine, task: Task, image: bytes | None, **overrides) -> EngineRequest:
    """The smallest render each family allows well, for tests that only compare outputs."""
    fields = dict(width=64, height=64, num_frames=9, num_inference_steps=3)
    fields.update(overrides)
    return make_request(engine, task, image, **fields)


def never_stop() -> bool:
    return False


# Loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "directory, pipeline_class, spatial, temporal, patch",
    [
        ("ltx-video-tiny", LTXPipeline, 32, 8, 1),
        ("cogvideox-tiny", CogVideoXPipeline, 8, 4, 2),
        ("cogvideox-i2v-tiny", CogVideoXImageToVideoPipeline, 8, 4, 2),
    ],
)
def test_tiny_model_loads_with_from_pretrained_and_keeps_real_compression(
    models_dir, directory, pipeline_class, spatial, temporal, patch
):
    pipe = pipeline_class.from_pretrained(models_dir / directory)
    if pipeline_class is LTXPipeline:
        ratios = (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio)
    else:
        ratios = (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal)
    assert ratios == (spatial, temporal)
    assert pipe.transformer.config.patch_size == patch
    assert type(pipe.tokenizer).__name__.startswith("T5Tokenizer")
    ids = pipe.tokenizer("a red fox in the snow").input_ids
    assert ids[-1] == pipe.tokenizer.eos_token_id and pipe.tokenizer.unk_token_id not in ids
    if pipeline_class is CogVideoXImageToVideoPipeline:
        # The image latents enter the transformer beside the noisy latents.
        assert pipe.transformer.config.in_channels == 2 * pipe.vae.config.latent_channels
    size = sum(f.stat().st_size for f in (models_dir / directory).rglob("*") if f.is_file())
    assert size < 4 * 1024 * 1024


def test_tiny_models_load_with_the_hub_offline(models_dir):
    script = (
        "import sys\n"
        "from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline, LTXPipeline\n"
        "d = sys.argv[1]\n"
        "LTXPipeline.from_pretrained(d + '/ltx-video-tiny')\n"
        "CogVideoXPipeline.from_pretrained(d + '/cogvideox-tiny')\n"
        "CogVideoXImageToVideoPipeline.from_pretrained(d + '/cogvideox-i2v-tiny')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script, str(models_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_importing_engines_package_and_tiny_configs_does_not_import_torch(tmp_path):
    script = (
        "import sys\n"
        "import farm.engines, farm.engines.tiny\n"
        "farm.engines.tiny.tiny_model_configs(sys.argv[1])\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_tiny_model_configs_keep_family_limits(models_dir):
    configs = {model.name: model for model in tiny_model_configs(models_dir)}
    ltx, cogvideox = configs["ltx-video-tiny"], configs["cogvideox-tiny"]
    assert ltx.sources == {task: str(models_dir / "ltx-video-tiny") for task in Task}
    assert cogvideox.sources == {
        Task.TEXT_TO_VIDEO: str(models_dir / "cogvideox-tiny"),
        Task.IMAGE_TO_VIDEO: str(models_dir / "cogvideox-i2v-tiny"),
    }
    for model in configs.values():
        assert model.limits == family_facts(model.family).limits
        defaults = model.defaults
        assert defaults.width % model.limits.size_multiple == 0
        assert defaults.height % model.limits.size_multiple == 0
        assert (defaults.num_frames - 1) % model.limits.frame_step == 0


def test_make_tiny_models_leaves_complete_directories_alone(models_dir):
    def snapshot() -> dict[str, tuple[int, int]]:
        return {
            str(path.relative_to(models_dir)): (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in models_dir.rglob("*")
        }

    before = snapshot()
    paths = make_tiny_models(models_dir)
    assert snapshot() == before
    assert sorted(p.name for p in paths) == sorted({d for _, tiny in tiny_models() for d in tiny.directories.values()})
    assert {"cogvideox-i2v-tiny", "cogvideox-tiny", "ltx-video-tiny", "wan-tiny"} <= {p.name for p in paths}
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")], "no staging directories left"


def test_tiny_models_are_deterministic_and_force_rewrites(models_dir, engines, tmp_path):
    make_tiny_models(tmp_path, force=True)
    for model in tiny_model_configs(tmp_path):
        # A fresh load of freshly written weights hashes the same as the module's engine.
        assert load_engine(model).weights_sha256 == engines[model.name].weights_sha256
    index = tmp_path / "ltx-video-tiny" / "model_index.json"
    inode = index.stat().st_ino
    make_tiny_models(tmp_path, force=True, families=["ltx-video"])
    assert index.stat().st_ino != inode


# Rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name, task", FAMILIES_AND_TASKS)
def test_render_gives_frames_progress_and_timings(engines, image_bytes, model_name, task):
    engine = engines[model_name]
    request = make_request(engine, task, image_bytes)
    events = []
    output = engine.render(request, events.append, never_stop)

    assert output.frames.shape == (request.num_frames, request.height, request.width, 3)
    assert output.frames.dtype == np.uint8
    assert output.frames.std() > 0

    steps = [e for e in events if e.stage == Stage.DENOISING and e.step > 0]
    assert [e.step for e in steps] == list(range(1, request.num_inference_steps + 1))
    assert all(e.total_steps == request.num_inference_steps and e.step_seconds > 0 for e in steps)
    stage_changes = [e.stage for e in events if e.step == 0]
    assert stage_changes == [Stage.ENCODING_PROMPT, Stage.DENOISING, Stage.DECODING]

    assert [t.phase for t in output.timings] == [Stage.ENCODING_PROMPT, Stage.DENOISING, Stage.DECODING]
    assert all(t.seconds > 0 and t.device_kind == "CPU" for t in output.timings)
    assert output.peak_memory_bytes is None  # only measured on CUDA


@pytest.mark.parametrize("model_name, task", FAMILIES_AND_TASKS)
def test_engine_decode_equals_the_pipelines_own_output(engines, image_bytes, model_name, task):
    engine = engines[model_name]
    request = make_request(engine, task, image_bytes)
    output = engine.render(request, lambda progress: None, never_stop)

    pipe = engine.pipeline(task)
    # The family's own arguments (sizes, steps, guidance, frame rate, image), and the prompt
    # as text: the pipeline encodes it itself and decodes its own way.
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB") if task == Task.IMAGE_TO_VIDEO else None
    kwargs = dict(engine.family.call_kwargs(request, image), generator=torch.Generator().manual_seed(request.seed),
                  output_type="np")
    if engine.family.FACTS.uses_prompt:
        kwargs.update(prompt=request.prompt, negative_prompt=request.negative_prompt)
    with torch.inference_mode():
        reference = pipe(**kwargs).frames[0]

    np.testing.assert_allclose(output.frames, frames_to_uint8(reference), atol=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("denormalize", [True, False])
def test_uint8_frames_have_the_bits_of_the_pipelines_video_processor(dtype, denormalize):
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=8, do_normalize=denormalize)
    generator = torch.Generator().manual_seed(0)
    # Beyond [-1, 1] on both sides, and exact halves, where rounding could differ.
    video = (torch.rand(1, 3, 5, 16, 24, generator=generator) * 2.4 - 1.2).to(dtype)
    video[0, 0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.5 / 255 * 2 - 1, 1.5 / 255 * 2 - 1]).to(dtype)

    expected = frames_to_uint8(processor.postprocess_video(video, output_type="np")[0])
    frames = video_to_uint8_frames(video, denormalize)

    assert frames.dtype == np.uint8 and frames.shape == (5, 16, 24, 3) and frames.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(frames, expected)
    assert 0 < frames.mean() < 255


@pytest.mark.parametrize("model_name, task", FAMILIES_AND_TASKS)
def test_same_seed_same_frames_other_seed_other_frames(engines, image_bytes, model_name, task):
    engine = engines[model_name]

    def render(seed: int) -> np.ndarray:
        request = small_request(engine, task, image_bytes, seed=seed)
        return engine.render(request, lambda progress: None, never_stop).frames

    first, again, other = render(7), render(7), render(8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("model_name", ["ltx-video-tiny", "cogvideox-tiny"])
def test_render_without_classifier_free_guidance(engines, model_name):
    # guidance_scale <= 1 turns guidance off: no negative prompt is encoded at all.
    engine = engines[model_name]
    request = small_request(engine, Task.TEXT_TO_VIDEO, None, guidance_scale=1.0)
    output = engine.render(request, lambda progress: None, never_stop)
    assert output.frames.shape == (request.num_frames, request.height, request.width, 3)


@pytest.mark.parametrize("model_name", ["ltx-video-tiny", "cogvideox-tiny"])
def test_cancel_at_step_two_raises_and_never_decodes(engines, image_bytes, model_name, monkeypatch):
    engine = engines[model_name]
    pipe = engine.pipeline(Task.TEXT_TO_VIDEO)
    decode_calls = []
    original_decode = pipe.vae.decode

    def counting_decode(*args, **kwargs):
        decode_calls.append(1)
        return original_decode(*args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", counting_decode)
    events = []

    def stop_after_two_steps() -> bool:
        return any(e.stage == Stage.DENOISING and e.step == 2 for e in events)

    request = small_request(engine, Task.TEXT_TO_VIDEO, image_bytes, num_inference_steps=6)
    with pytest.raises(RenderCancelled) as cancelled:
        engine.render(request, events.append, stop_after_two_steps)

    assert cancelled.value.step == 2
    assert decode_calls == []
    assert [e.step for e in events if e.stage == Stage.DENOISING and e.step > 0] == [1, 2]
    assert Stage.DECODING not in [e.stage for e in events]
    assert [t.phase for t in cancelled.value.timings] == [Stage.ENCODING_PROMPT, Stage.DENOISING]

    # The counter does see decodes, and a cancelled render leaves the engine usable.
    output = engine.render(request, lambda progress: None, never_stop)
    assert decode_calls == [1]
    assert output.frames.shape == (request.num_frames, request.height, request.width, 3)


def test_stop_before_any_step_raises_with_step_zero(engines, image_bytes):
    engine = engines["ltx-video-tiny"]
    events = []
    with pytest.raises(RenderCancelled) as cancelled:
        engine.render(small_request(engine, Task.TEXT_TO_VIDEO, image_bytes), events.append, lambda: True)
    assert cancelled.value.step == 0 and cancelled.value.timings == [] and events == []


# Errors, health, description --------------------------------------------------------------


def test_task_not_served_raises_value_error(models_dir, image_bytes):
    text_only = ModelConfig(
        name="cogvideox-t2v-only",
        family=Family.COGVIDEOX,
        sources={Task.TEXT_TO_VIDEO: str(models_dir / "cogvideox-tiny")},
    )
    engine = load_engine(text_only)
    with pytest.raises(ValueError, match="does not serve task"):
        engine.render(small_request(engine, Task.IMAGE_TO_VIDEO, image_bytes), lambda p: None, never_stop)


def test_image_to_video_needs_a_readable_image(engines):
    engine = engines["ltx-video-tiny"]
    for image in (None, b"not an image"):
        request = small_request(engine, Task.IMAGE_TO_VIDEO, image)
        with pytest.raises(ValueError, match="image"):
            engine.render(request, lambda p: None, never_stop)


def test_cogvideox_refuses_frame_counts_its_vae_cannot_return(engines):
    engine = engines["cogvideox-tiny"]
    request = small_request(engine, Task.TEXT_TO_VIDEO, None, num_frames=13)
    with pytest.raises(ValueError, match="8k\\+1"):
        engine.render(request, lambda p: None, never_stop)


# The families whose pipelines fail below their min_steps, and how (the others' reason is
# what one step gives, e.g. AnimateDiff's lone DDIM step at timestep 0 returns the noise;
# their modules' tests show it).
FAILS_BELOW_MIN_STEPS = {"ltx-video-tiny": IndexError}


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("model_name, task", FAMILIES_AND_TASKS)
def test_the_familys_fewest_steps_render_and_one_fewer_is_why_the_limit_exists(engines, image_bytes, model_name,
                                                                               task):
    """`limits.min_steps` is the engines' real minimum: the gateway refuses fewer
    (farm.domain.spec). LTX-Video's scheduler (shift_terminal) cannot take one step: should
    this start rendering after a diffusers upgrade, LTX-Video's min_steps can go down."""
    engine = engines[model_name]
    limits = engine.model.limits
    fewest = limits.min_steps
    side = -(-max(32, limits.min_size) // limits.size_multiple) * limits.size_multiple
    output = engine.render(small_request(engine, task, image_bytes, width=side, height=side,
                                         num_inference_steps=fewest), lambda p: None, never_stop)
    assert output.frames.shape == (9, side, side, 3) and output.frames.std() > 0
    if fewest > 1 and model_name in FAILS_BELOW_MIN_STEPS:
        with pytest.raises(FAILS_BELOW_MIN_STEPS[model_name]):
            engine.render(small_request(engine, task, image_bytes, width=side, height=side,
                                        num_inference_steps=fewest - 1), lambda p: None, never_stop)


def test_weights_hash_is_stable_across_loads(models_dir, engines):
    ltx = next(m for m in tiny_model_configs(models_dir) if m.name == "ltx-video-tiny")
    assert load_engine(ltx).weights_sha256 == engines["ltx-video-tiny"].weights_sha256
    assert engines["ltx-video-tiny"].weights_sha256 != engines["cogvideox-tiny"].weights_sha256


def test_ltx_tasks_share_one_set_of_weights(engines):
    engine = engines["ltx-video-tiny"]
    text, image = engine.pipeline(Task.TEXT_TO_VIDEO), engine.pipeline(Task.IMAGE_TO_VIDEO)
    assert type(text).__name__ == "LTXPipeline" and type(image).__name__ == "LTXImageToVideoPipeline"
    assert image.transformer is text.transformer and image.vae is text.vae


def test_health_check_and_description(engines):
    engine = engines["cogvideox-tiny"]
    engine.check_health()
    description = engine.describe()
    assert description["model"] == "cogvideox-tiny"
    assert description["family"] == "cogvideox"
    assert description["backend"] == engine.backend == "eager-float32"
    assert description["dtype"] == "float32" and description["device"] == "cpu"
    assert description["device_kind"] == engine.device_kind == "CPU"
    assert description["weights_sha256"] == engine.weights_sha256 and len(engine.weights_sha256) == 64
    assert set(description["sources"]) == {"text-to-video", "image-to-video"}
    assert set(description["versions"]) == {"torch", "diffusers", "transformers"}
