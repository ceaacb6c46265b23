"""Stable Video Diffusion (`farm.families.stable_video_diffusion`): the motion fields' limits and
where they go in the pipeline call, the tiny model, the engine's frames against the pipeline's
own (every motion field changing them), the set-up's one draw from the generator and a bitwise
resume, and the memory constants counted on torch's meta device."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from farm.config import ModelConfig
from farm.domain.engine import DenoiseCheckpoint, EngineRequest, RenderPreempted
from farm.domain.spec import RenderSpec, Task
from farm.engines.pipeline_engine import frames_to_uint8
from farm.families import Family, StepCarry, family_facts
from farm.families import stable_video_diffusion as svd

TINY = svd.FACTS.tiny.name
I2V = Task.IMAGE_TO_VIDEO


def png(seed: int = 0, size: tuple[int, int] = (200, 150)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request_of(**overrides) -> EngineRequest:
    """A small request at the tiny model's defaults, with any field overridden."""
    defaults = svd.FACTS.tiny.defaults
    fields = dict(
        render_id="r-1", attempt=1, task=I2V, prompt="", negative_prompt="", image=png(),
        width=defaults.width, height=defaults.height, num_frames=defaults.num_frames, fps=defaults.fps,
        num_inference_steps=4, guidance_scale=defaults.guidance_scale, seed=1234,
    )
    fields.update(overrides)
    return EngineRequest(**fields)


def never() -> bool:
    return False


# The facts -------------------------------------------------------------------------------


def test_facts_describe_an_image_only_unet_family_with_a_step_indexed_euler():
    facts = family_facts(Family.STABLE_VIDEO_DIFFUSION)
    assert facts is svd.FACTS and svd.FAMILY is Family.STABLE_VIDEO_DIFFUSION
    assert (facts.denoiser, facts.uses_prompt, facts.audio) == ("unet", False, False)
    assert set(facts.tiny.directories) == {I2V} and set(svd.pipeline_classes()) == {I2V}
    assert facts.checkpoint_schedulers == {"EulerDiscreteScheduler": StepCarry.STEP_INDEXED}
    # SVD-XT's trained clip is the default and the most; every count in between renders.
    assert facts.defaults.num_frames == facts.limits.max_frames == 25 and facts.limits.frame_step == 1
    assert (facts.defaults.width, facts.defaults.height, facts.defaults.fps) == (1024, 576, 7)
    # The published UNet's first stage is 320 channels: the estimate's width is twice that.
    assert svd.activation_width(svd.PUBLISHED_CONFIGS["unet"]) == facts.memory.published.hidden_size == 640
    assert svd.joint_text_tokens({}) == 0


# The motion fields -----------------------------------------------------------------------


def test_motion_fields_left_unset_or_in_range_are_fine():
    assert svd.check_motion_fields(None, None, None, 25) == []
    assert svd.check_motion_fields(0, 0.0, 1, 25) == []
    assert svd.check_motion_fields(255, 1.0, 25, 25) == []
    assert svd.check_motion_fields(svd.DEFAULT_MOTION_BUCKET, svd.DEFAULT_NOISE_AUG, svd.DEFAULT_DECODE_CHUNK_SIZE,
                                   25) == []


@pytest.mark.parametrize("motion, noise, chunk, frames, field, words", [
    (256, None, None, 25, "motion_bucket_id", "256 is outside 0..255"),
    (-1, None, None, 25, "motion_bucket_id", "-1 is outside 0..255"),
    (1.5, None, None, 25, "motion_bucket_id", "whole number"),
    (True, None, None, 25, "motion_bucket_id", "whole number"),
    (None, 1.01, None, 25, "noise_aug_strength", "1.01 is outside 0..1"),
    (None, -0.1, None, 25, "noise_aug_strength", "-0.1 is outside 0..1"),
    (None, math.nan, None, 25, "noise_aug_strength", "nan is outside 0..1"),
    (None, math.inf, None, 25, "noise_aug_strength", "inf is outside 0..1"),
    (None, None, 0, 25, "decode_chunk_size", "0 is outside 1..25"),
    (None, None, 15, 14, "decode_chunk_size", "15 is outside 1..14"),
    (None, None, 2.0, 14, "decode_chunk_size", "whole number"),
])
def test_out_of_range_motion_fields_are_refused_naming_the_field(motion, noise, chunk, frames, field, words):
    [(named, reason)] = svd.check_motion_fields(motion, noise, chunk, frames)
    assert named == field and words in reason


def test_every_bad_motion_field_is_named_at_once():
    problems = dict(svd.check_motion_fields(300, 2.0, 30, 25))
    assert set(problems) == {"motion_bucket_id", "noise_aug_strength", "decode_chunk_size"}


def test_call_kwargs_map_guidance_fps_and_the_motion_fields():
    image = Image.new("RGB", (200, 150))
    defaults = svd.call_kwargs(request_of(guidance_scale=2.5, fps=12, num_frames=20), image)
    assert defaults == dict(
        image=image, height=64, width=128, num_frames=20, num_inference_steps=4,
        # The request's guidance is the last frame's; the first frame's stays at the pipeline's 1.0.
        min_guidance_scale=1.0, max_guidance_scale=2.5,
        fps=12,  # the pipeline conditions the UNet on fps - 1 itself
        motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=14,
    )
    # A clip shorter than the default chunk decodes at once, as the pipeline's own default does.
    assert svd.call_kwargs(request_of(num_frames=8), image)["decode_chunk_size"] == 8
    asked = svd.call_kwargs(request_of(motion_bucket_id=40, noise_aug_strength=0.1, decode_chunk_size=3), image)
    assert (asked["motion_bucket_id"], asked["noise_aug_strength"], asked["decode_chunk_size"]) == (40, 0.1, 3)
    assert svd.encode_prompt(None, request_of(), torch.device("cpu")) == {}


def test_call_kwargs_fall_back_to_the_defaults_for_a_request_without_the_fields():
    @dataclasses.dataclass
    class OlderRequest:  # an EngineRequest from before the motion fields
        task: Task
        width: int
        height: int
        num_frames: int
        fps: int
        num_inference_steps: int
        guidance_scale: float

    kwargs = svd.call_kwargs(OlderRequest(I2V, 128, 64, 8, 7, 4, 3.0), None)
    assert (kwargs["motion_bucket_id"], kwargs["noise_aug_strength"], kwargs["decode_chunk_size"]) == (127, 0.02, 8)


def test_call_kwargs_refuse_what_the_checks_refuse_and_text_to_video():
    with pytest.raises(ValueError, match="motion_bucket_id: 400 is outside 0..255"):
        svd.call_kwargs(request_of(motion_bucket_id=400), None)
    with pytest.raises(ValueError, match="decode_chunk_size: 9 is outside 1..8"):
        svd.call_kwargs(request_of(decode_chunk_size=9), None)
    with pytest.raises(ValueError, match="image-to-video only"):
        svd.call_kwargs(request_of(task=Task.TEXT_TO_VIDEO, image=None), None)


def test_the_gateway_refuses_bad_motion_fields_and_a_prompt_naming_the_field():
    from farm.domain.errors import InvalidArgument
    from farm.jobs.validation import resolve_spec

    models = {"svd": ModelConfig(name="svd", family=Family.STABLE_VIDEO_DIFFUSION, sources={I2V: "svd-dir"})}
    resolved = resolve_spec(RenderSpec(model="svd", task=I2V, image=png(), motion_bucket_id=30), models)
    assert (resolved.motion_bucket_id, resolved.num_frames, resolved.width) == (30, 25, 1024)
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(RenderSpec(model="svd", task=I2V, image=png(), noise_aug_strength=3.0, decode_chunk_size=26),
                     models)
    fields = {v.field: v.description for v in caught.value.violations}
    assert any(f.endswith("noise_aug_strength") and "outside 0..1" in d for f, d in fields.items())
    assert any(f.endswith("decode_chunk_size") and "outside 1..25" in d for f, d in fields.items())


# The tiny model --------------------------------------------------------------------------


def test_tiny_model_round_trips_with_the_real_compression_and_the_published_scheduler(models_dir):
    from diffusers import DiffusionPipeline, StableVideoDiffusionPipeline

    directory = models_dir / svd.FACTS.tiny.directories[I2V]
    pipe = DiffusionPipeline.from_pretrained(directory)
    assert type(pipe) is StableVideoDiffusionPipeline
    assert pipe.vae_scale_factor == 8
    # The UNet halves its latents three times, as SVD's does (four stages).
    assert sum(block.downsamplers is not None for block in pipe.unet.down_blocks) == 3
    assert pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels  # noise + image latents
    assert pipe.image_encoder.config.projection_dim == pipe.unet.config.cross_attention_dim
    scheduler = pipe.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    for key, value in svd.PUBLISHED_CONFIGS["scheduler"].items():
        assert scheduler.config[key] == value, key
    # Karras sigmas from sigma_max 700 with "leading" spacing: the pipeline scales its starting
    # noise (and any latents it is given) by sqrt(700² + 1), not 1.
    scheduler.set_timesteps(4)
    assert float(scheduler.init_noise_sigma) == pytest.approx(math.sqrt(700.0 ** 2 + 1))
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size < 8 * 1024 * 1024


def test_sizes_are_read_from_the_tiny_models_files(models_dir):
    from farm.planning.memory import read_pipeline_sizes

    sizes = read_pipeline_sizes(models_dir / svd.FACTS.tiny.directories[I2V], Family.STABLE_VIDEO_DIFFUSION)
    assert set(sizes.parameters) == {"unet", "vae", "image_encoder"}
    assert (sizes.vae_channels, sizes.vae_patch_size, sizes.joint_text_tokens) == (32, 1, 0)


# Rendering -------------------------------------------------------------------------------


def pipeline_frames(engine, request: EngineRequest, motion=127, noise=0.02, chunk=None) -> np.ndarray:
    """The pipeline's own uint8 frames for a request, called as its docs show."""
    pipe = engine.pipeline(I2V)
    with torch.inference_mode():
        frames = pipe(
            Image.open(io.BytesIO(request.image)).convert("RGB"), height=request.height, width=request.width,
            num_frames=request.num_frames, num_inference_steps=request.num_inference_steps,
            min_guidance_scale=1.0, max_guidance_scale=request.guidance_scale, fps=request.fps,
            motion_bucket_id=motion, noise_aug_strength=noise, decode_chunk_size=chunk,
            generator=torch.Generator().manual_seed(request.seed), output_type="np",
        ).frames[0]
    return frames_to_uint8(frames)


@pytest.mark.parametrize("fields", [{}, {"motion_bucket_id": 200, "noise_aug_strength": 0.1, "decode_chunk_size": 3}])
def test_engine_frames_equal_the_pipelines_own(engines, fields):
    engine = engines[TINY]
    request = request_of(num_frames=9, **fields)
    output = engine.render(request, lambda progress: None, never)
    assert output.frames.shape == (9, 64, 128, 3) and output.frames.std() > 0
    reference = pipeline_frames(engine, request, fields.get("motion_bucket_id", 127),
                                fields.get("noise_aug_strength", 0.02), fields.get("decode_chunk_size"))
    np.testing.assert_allclose(output.frames, reference, atol=1)


def test_every_motion_field_and_the_frame_rate_change_the_frames(engines):
    engine = engines[TINY]

    def render(**fields) -> np.ndarray:
        request = request_of(num_frames=6, num_inference_steps=2, **fields)
        return engine.render(request, lambda progress: None, never).frames

    base = render()
    np.testing.assert_array_equal(base, render(motion_bucket_id=127, noise_aug_strength=0.02))  # the defaults
    for fields in ({"motion_bucket_id": 220}, {"noise_aug_strength": 0.3}, {"decode_chunk_size": 3}, {"fps": 20}):
        assert not np.array_equal(render(**fields), base), fields


def test_the_set_up_draws_once_from_the_generator_first_so_a_resume_draws_the_same(engines, monkeypatch):
    """The image's noise augmentation is the set-up's one draw besides the latents' noise, and
    the generator's first: a call given latents (a resume) draws only it, from the fresh seed."""
    from diffusers.pipelines.stable_video_diffusion import (
        pipeline_stable_video_diffusion as module,
    )

    engine = engines[TINY]
    pipe = engine.pipeline(I2V)
    draws: list[tuple[tuple, torch.Tensor]] = []
    original = module.randn_tensor

    def recording(shape, generator=None, **kwargs):
        draws.append((tuple(shape), generator.get_state().clone()))
        return original(shape, generator=generator, **kwargs)

    monkeypatch.setattr(module, "randn_tensor", recording)
    request = request_of()
    seeded = torch.Generator().manual_seed(request.seed).get_state()
    kwargs = svd.call_kwargs(request, Image.open(io.BytesIO(request.image)).convert("RGB"))
    with torch.inference_mode():
        latents = pipe(**kwargs, generator=torch.Generator().manual_seed(request.seed), output_type="latent",
                       return_dict=False)
        image_shape = (1, 3, request.height, request.width)
        latent_shape = (1, request.num_frames, 4, request.height // 8, request.width // 8)
        assert [shape for shape, _ in draws] == [image_shape, latent_shape]
        assert torch.equal(draws[0][1], seeded)
        draws.clear()
        pipe(**kwargs, latents=latents, generator=torch.Generator().manual_seed(request.seed), output_type="latent",
             return_dict=False)
    assert [shape for shape, _ in draws] == [image_shape] and torch.equal(draws[0][1], seeded)


def test_a_preempted_render_resumes_to_the_uninterrupted_frames_bitwise(engines):
    engine = engines[TINY]
    assert engine.supports_checkpoint, engine.checkpoint_unsupported
    request = request_of(motion_bucket_id=60, noise_aug_strength=0.05)
    uninterrupted = engine.render(request, lambda progress: None, never)

    steps: list[int] = []

    def on_progress(progress) -> None:
        if progress.step:
            steps.append(progress.step)

    with pytest.raises(RenderPreempted) as raised:
        engine.render(request, on_progress, never, should_preempt=lambda: bool(steps) and steps[-1] >= 2)
    checkpoint = DenoiseCheckpoint.from_bytes(raised.value.checkpoint.to_bytes())
    assert checkpoint.step == 2 and checkpoint.total_steps == 4
    assert checkpoint.scheduler_state["class"] == "EulerDiscreteScheduler"

    resumed_steps: list[int] = []
    resumed = engine.render(request, lambda p: resumed_steps.append(p.step) if p.step else None, never,
                            resume=checkpoint)
    assert resumed_steps == [3, 4]
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)
    # The scheduler is itself again after the resumed call (its init_noise_sigma is not 1).
    assert float(engine.pipeline(I2V).scheduler.init_noise_sigma) > 1


# Memory on the meta device ---------------------------------------------------------------


def live_bytes(module, call) -> int:
    from tests.unit.test_memory import LiveBytes

    return LiveBytes(*module.parameters(), *module.buffers()).run(call)


def estimate(width: int, height: int, frames: int, guidance: float = 3.0):
    from farm.jobs.validation import resolve_spec
    from farm.planning.memory import estimate_memory, read_footprint

    model = ModelConfig(name="m", family=Family.STABLE_VIDEO_DIFFUSION, sources={I2V: "no-such-dir"})
    spec = resolve_spec(RenderSpec(model="m", task=I2V, image=png(), width=width, height=height, num_frames=frames,
                                   guidance_scale=guidance), {"m": model})
    return estimate_memory(spec, model, read_footprint(model), margin=0)


def test_published_parameter_counts_are_those_of_the_published_configs():
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        counted = {
            "unet": UNetSpatioTemporalConditionModel(**svd.PUBLISHED_CONFIGS["unet"]),
            "vae": AutoencoderKLTemporalDecoder(**svd.PUBLISHED_CONFIGS["vae"]),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**svd.PUBLISHED_CONFIGS["image_encoder"])),
        }
    assert {name: sum(p.numel() for p in m.parameters()) for name, m in counted.items()} == \
        svd.FACTS.memory.published.parameters


def test_denoising_estimate_covers_a_full_size_unet_pass(meta_attention):
    """The published UNet, one guided pass (batch 2) in bfloat16 over SVD-XT's 14-frame half at
    the trained size: what it keeps alive is within the estimate, and the estimate within 1.6x."""
    meta, dtype = torch.device("meta"), torch.bfloat16
    unet = _meta_unet(dtype)
    width, height, frames = 1024, 576, 14

    def call():
        unet(torch.empty(2, frames, 8, height // 8, width // 8, dtype=dtype, device=meta),
             torch.empty((), dtype=dtype, device=meta),
             encoder_hidden_states=torch.empty(2, 1, 1024, dtype=dtype, device=meta),
             added_time_ids=torch.empty(2, 3, dtype=dtype, device=meta), return_dict=False)

    counted = live_bytes(unet, call)
    estimated = estimate(width, height, frames).denoising_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / 2**30, estimated / 2**30)


def _meta_unet(dtype):
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**svd.PUBLISHED_CONFIGS["unet"])
    # Its time mixers' factors are made with torch.Tensor([...]), which stays on the CPU.
    return unet.to(torch.device("meta"), dtype)


def test_decoding_estimate_covers_the_pipelines_chunked_decode():
    """The published VAE decodes SVD-XT's 25 frames at 1024 x 576 in bfloat16 as the pipeline
    does, `DEFAULT_DECODE_CHUNK_SIZE` frames at a time: exactly `vae_widths` copies of its last
    stage per frame of a chunk are alive at the peak; the estimate covers it, within 1.6x."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline

    meta, dtype = torch.device("meta"), torch.bfloat16
    with meta:
        vae = AutoencoderKLTemporalDecoder(**svd.PUBLISHED_CONFIGS["vae"])
    vae = vae.to(meta, dtype)  # its time mixers' factors are made on the CPU (torch.Tensor([...]))
    width, height, frames, chunk = 1024, 576, 25, svd.DEFAULT_DECODE_CHUNK_SIZE

    def decode_chunk():
        vae.decode(torch.empty(chunk, 4, height // 8, width // 8, dtype=dtype, device=meta), num_frames=chunk)

    one_chunk = live_bytes(vae, decode_chunk)
    assert round(one_chunk / (128 * chunk * height * width * 2), 2) == svd.FACTS.memory.vae_widths

    def decode_all():
        latents = torch.empty(1, frames, 4, height // 8, width // 8, dtype=dtype, device=meta)
        video = StableVideoDiffusionPipeline.decode_latents(SimpleNamespace(vae=vae), latents, frames, chunk)
        assert video.shape == (1, 3, frames, height, width)

    counted = live_bytes(vae, decode_all)
    estimated = estimate(width, height, frames, guidance=1.0).decoding_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / 2**30, estimated / 2**30)


@pytest.fixture
def meta_attention(monkeypatch):
    from tests.unit.test_memory import efficient_attention

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", efficient_attention)
