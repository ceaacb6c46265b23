"""Wan (`farm.families.wan`): the tiny models' published layout, the refusal of frame counts
the VAE cannot return, image-to-video's first-frame conditioning, set-ups that draw nothing
given latents, the Wan 2.2 image-to-video layout and video-to-video on the same components,
resumption with flow-matching Euler, and the memory facts against the published models on
torch's meta device. The shared engine, preemption and registry tests cover the tiny models
too (tests/unit/test_engines.py, test_preemption.py, test_families.py)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from farm.config import Task
from farm.domain.engine import DenoiseCheckpoint, EngineRequest, RenderPreempted
from farm.engines import load_engine
from farm.engines.pipeline_engine import frames_to_uint8, video_to_uint8_frames
from farm.engines.tiny import tiny_model_configs
from farm.families import Family, wan
from farm.planning.memory import estimate_memory, read_footprint
from tests.unit.test_memory import LiveBytes, meta_attention, published_config, spec_of  # noqa: F401

T2V, I2V = Task.TEXT_TO_VIDEO, Task.IMAGE_TO_VIDEO
GIB = 1024**3


def png(seed: int, size=(200, 150)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request(task: Task, **overrides) -> EngineRequest:
    fields = dict(
        render_id="r-1", attempt=1, task=task, prompt="a red fox running through a snowy forest",
        negative_prompt="blurry", image=png(0) if task == I2V else None, width=64, height=64, num_frames=9,
        fps=16, num_inference_steps=3, guidance_scale=5.0, seed=1234,
    )
    fields.update(overrides)
    return EngineRequest(**fields)


def never() -> bool:
    return False


@pytest.fixture(scope="module")
def engine(engines):
    return engines["wan-tiny"]


def family_render(pipe, req: EngineRequest, image: Image.Image | None = None, **extra) -> np.ndarray:
    """What the engine does with a pipeline, by the family's functions: uint8 frames."""
    with torch.inference_mode():
        kwargs = wan.call_kwargs(req, image)
        kwargs.update(extra)
        latents = pipe(**kwargs, **wan.encode_prompt(pipe, req, torch.device("cpu")), output_type="latent",
                       generator=torch.Generator().manual_seed(req.seed), return_dict=False)[0]
        return video_to_uint8_frames(wan.decode_latents(pipe, latents, req, None))


def own_render(pipe, req: EngineRequest, **extra) -> np.ndarray:
    """The pipeline's own render of the same request, as uint8 frames."""
    with torch.inference_mode():
        video = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, height=req.height, width=req.width,
                     num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                     generator=torch.Generator().manual_seed(req.seed), output_type="np", **extra).frames
    return frames_to_uint8(video[0])


# The tiny models -------------------------------------------------------------------------


def test_the_tiny_models_keep_the_published_layout_and_round_trip(models_dir):
    from diffusers import (
        DiffusionPipeline,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
    )
    from transformers import CLIPVisionModel, UMT5EncoderModel

    text = DiffusionPipeline.from_pretrained(models_dir / "wan-tiny")
    image = DiffusionPipeline.from_pretrained(models_dir / "wan-i2v-tiny")
    assert type(text) is WanPipeline and type(image) is WanImageToVideoPipeline
    for pipe in (text, image):
        assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (8, 4)
        assert tuple(pipe.transformer.config.patch_size) == (1, 2, 2)
        assert isinstance(pipe.text_encoder, UMT5EncoderModel)
        ids = pipe.tokenizer("a red fox in the snow").input_ids
        assert ids[-1] == pipe.tokenizer.eos_token_id and pipe.tokenizer.unk_token_id not in ids
        # The published scheduler: UniPC on shifted flow sigmas, which preemption keeps whole.
        assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
        config = pipe.scheduler.config
        assert (config.prediction_type, config.use_flow_sigmas, config.flow_shift) == ("flow_prediction", True, 3.0)
        assert wan.FACTS.checkpoint_schedulers["UniPCMultistepScheduler"].value == "multistep"
    # Wan 2.1 image-to-video: noisy latents, a 4-channel first-frame mask and the image's
    # latents side by side, and the CLIP encoder's hidden states through added keys and values.
    z_dim = image.vae.config.z_dim
    assert image.transformer.config.in_channels == 2 * z_dim + 4 == 36
    assert isinstance(image.image_encoder, CLIPVisionModel)
    assert image.transformer.config.image_dim == image.image_encoder.config.hidden_size
    assert image.transformer.config.added_kv_proj_dim == image.transformer.config.num_attention_heads * 16
    assert image.image_processor is not None
    for directory in ("wan-tiny", "wan-i2v-tiny"):
        size = sum(f.stat().st_size for f in (models_dir / directory).rglob("*") if f.is_file())
        assert size < 4 * 1024 * 1024


# Frame counts ----------------------------------------------------------------------------


def test_frame_counts_other_than_4k_plus_1_are_refused_before_any_work(engine):
    events = []
    with pytest.raises(ValueError, match=r"Wan renders 4k\+1 frames .* would render 9 frames for 10"):
        engine.render(request(T2V, num_frames=10), events.append, never)
    assert events == []
    # That is what the pipeline does with 10 frames: it rounds down to 9, 3 latent frames.
    pipe = engine.pipeline(T2V)
    with torch.inference_mode():
        latents = pipe(prompt="a fox", height=32, width=32, num_frames=10, num_inference_steps=1,
                       output_type="latent", generator=torch.Generator().manual_seed(0)).frames
        video = wan.decode_latents(pipe, latents, request(T2V, num_frames=10), None)
    assert latents.shape[2] == 3 and video.shape[2] == 9
    for frames in (5, 9, 81):
        assert wan.call_kwargs(request(T2V, num_frames=frames), None)["num_frames"] == frames


# Image-to-video --------------------------------------------------------------------------


def test_image_to_video_conditions_on_the_encoded_first_frame(engine):
    """The transformer sees the first-frame mask and the image's normalised VAE latents (the
    distribution's mode, the video being the image then zeros) beside the noisy latents, and
    the CLIP encoder's penultimate hidden states; a render depends on the image."""
    pipe = engine.pipeline(I2V)
    seen: list[dict] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    try:
        first = engine.render(request(I2V, num_inference_steps=2), lambda p: None, never)
    finally:
        handle.remove()
    assert len(seen) == 4  # two steps, guided: two calls each
    inputs = seen[0]["hidden_states"]
    z_dim = pipe.vae.config.z_dim
    assert inputs.shape == (1, 2 * z_dim + 4, 3, 8, 8)
    mask = inputs[:, z_dim:z_dim + 4]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)

    image = Image.open(io.BytesIO(png(0))).convert("RGB")
    with torch.inference_mode():
        pixels = pipe.video_processor.preprocess(image, height=64, width=64).unsqueeze(2)
        video = torch.cat([pixels, pixels.new_zeros(1, 3, 8, 64, 64)], dim=2)
        mode = pipe.vae.encode(video).latent_dist.mode()
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1)
        torch.testing.assert_close(inputs[:, z_dim + 4:], (mode - mean) * (1.0 / std), rtol=0, atol=1e-6)
        embeds = pipe.encode_image(image, torch.device("cpu"))
    assert embeds.shape == (1, 5, pipe.image_encoder.config.hidden_size)  # 4 patches and the class token
    assert all(torch.equal(call["encoder_hidden_states_image"], embeds) for call in seen)

    again = engine.render(request(I2V, num_inference_steps=2), lambda p: None, never)
    other = engine.render(request(I2V, num_inference_steps=2, image=png(1)), lambda p: None, never)
    np.testing.assert_array_equal(first.frames, again.frames)
    assert not np.array_equal(first.frames, other.frames)


@pytest.mark.parametrize("task", [T2V, I2V])
def test_given_latents_the_set_up_draws_nothing_from_the_generator(engine, task):
    """Why both pipelines resume: their set-up draws only the initial noise, which given
    latents replace (the image's encode is the VAE's mode), and UniPC draws nothing."""
    pipe = engine.pipeline(task)
    req = request(task, num_inference_steps=2)
    image = Image.open(io.BytesIO(req.image)).convert("RGB") if req.image else None
    generator = torch.Generator().manual_seed(5)
    before = generator.get_state()
    latents = torch.randn(1, pipe.vae.config.z_dim, 3, 8, 8)
    with torch.inference_mode():
        pipe(**wan.call_kwargs(req, image), **wan.encode_prompt(pipe, req, torch.device("cpu")), latents=latents,
             generator=generator, output_type="latent")
    assert torch.equal(generator.get_state(), before)
    # Without latents the noise comes from the generator.
    with torch.inference_mode():
        pipe(**wan.call_kwargs(req, image), **wan.encode_prompt(pipe, req, torch.device("cpu")),
             generator=generator, output_type="latent")
    assert not torch.equal(generator.get_state(), before)


def test_wan22_image_to_video_layout_without_an_image_encoder(engine):
    """Wan 2.2 image-to-video has no CLIP encoder (``image_dim`` None): the same pipeline
    class skips it, and the family's phases give the pipeline's own frames."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    tiny = engine.pipeline(I2V)
    torch.manual_seed(0)
    config = dict(tiny.transformer.config, image_dim=None, added_kv_proj_dim=None)
    transformer = WanTransformer3DModel.from_config(config).eval()
    pipe = WanImageToVideoPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=tiny.vae,
                                   scheduler=tiny.scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.image_encoder is None
    req = request(I2V)
    image = Image.open(io.BytesIO(req.image)).convert("RGB")
    frames = family_render(pipe, req, image)
    assert frames.shape == (9, 64, 64, 3) and frames.std() > 0
    np.testing.assert_array_equal(frames, own_render(pipe, req, image=image, num_frames=9))


# Video-to-video (not a task yet) -----------------------------------------------------------


def test_video_to_video_runs_on_the_text_to_video_components(engine):
    """The coming task's pipeline, assembled from the text-to-video pipeline's components: it
    denoises the last int(steps x strength) steps, and `decode_latents` is its decode."""
    cls = wan.video_to_video_pipeline_class()
    assert cls.__name__ == "WanVideoToVideoPipeline" and cls not in wan.pipeline_classes().values()
    text = engine.pipeline(T2V)
    names = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
    pipe = cls(**{name: text.components[name] for name in names})
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer is text.transformer and pipe.vae is text.vae
    rng = np.random.default_rng(3)
    video = [Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)) for _ in range(9)]
    req = request(T2V, num_inference_steps=4)
    steps: list[int] = []
    with torch.inference_mode():
        latents = pipe(video=video, **wan.encode_prompt(pipe, req, torch.device("cpu")), height=64, width=64,
                       num_inference_steps=4, guidance_scale=req.guidance_scale, strength=0.5,
                       generator=torch.Generator().manual_seed(req.seed), output_type="latent",
                       callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {}).frames
        frames = video_to_uint8_frames(wan.decode_latents(pipe, latents, req, None))
    assert steps == [0, 1]
    assert frames.shape == (9, 64, 64, 3)
    np.testing.assert_array_equal(frames, own_render(pipe, req, video=video, strength=0.5))


# Flow-matching Euler ---------------------------------------------------------------------


def with_flow_match_euler(models_dir: Path, tmp_path: Path) -> Path:
    """The tiny Wan models with FlowMatchEulerDiscreteScheduler (shift 3) in place of UniPC."""
    sources = {}
    model = next(m for m in tiny_model_configs(models_dir) if m.family == Family.WAN)
    for task, source in model.sources.items():
        target = tmp_path / Path(source).name
        shutil.copytree(source, target)
        (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}))
        index = json.loads((target / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        (target / "model_index.json").write_text(json.dumps(index))
        sources[task] = str(target)
    return model.model_copy(update={"sources": sources})


@pytest.fixture(scope="module")
def euler_engine(models_dir, tmp_path_factory):
    return load_engine(with_flow_match_euler(models_dir, tmp_path_factory.mktemp("wan-euler")))


@pytest.mark.parametrize("task", [T2V, I2V])
def test_flow_match_euler_resumes_bitwise(euler_engine, task):
    assert type(euler_engine.pipeline(task).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert euler_engine.supports_checkpoint
    req = request(task, num_inference_steps=4)
    uninterrupted = euler_engine.render(req, lambda p: None, never)
    events = []
    with pytest.raises(RenderPreempted) as preempted:
        euler_engine.render(req, events.append, never,
                            should_preempt=lambda: any(e.step == 2 for e in events))
    checkpoint = DenoiseCheckpoint.from_bytes(preempted.value.checkpoint.to_bytes())
    assert checkpoint.step == 2
    resumed = euler_engine.render(req, lambda p: None, never, resume=checkpoint)
    np.testing.assert_array_equal(resumed.frames, uninterrupted.frames)


# Memory ----------------------------------------------------------------------------------


def test_memory_sizes_are_read_from_the_tiny_pipelines(models_dir):
    model = next(m for m in tiny_model_configs(models_dir) if m.family == Family.WAN)
    footprint = read_footprint(model)
    assert len(footprint.pipelines) == 2
    text, image = footprint.for_task(T2V), footprint.for_task(I2V)
    assert set(text.parameters) == {"transformer", "text_encoder", "vae"}
    assert set(image.parameters) == {"transformer", "text_encoder", "vae", "image_encoder"}
    for sizes in (text, image):
        assert (sizes.hidden_size, sizes.joint_text_tokens, sizes.vae_patch_size, sizes.vae_tile) == (32, 0, 1,
                                                                                                     (256, 256))
        # The Wan VAE's config names no block channels: the published last stage's stands in.
        assert sizes.vae_channels == 96


def test_published_parameters_are_the_published_configs_counted():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        counted = {
            "transformer": WanTransformer3DModel(**wan.PUBLISHED_TRANSFORMER),
            "text_encoder": UMT5EncoderModel(UMT5Config(**wan.PUBLISHED_TEXT_ENCODER)),
            "vae": AutoencoderKLWan(**wan.PUBLISHED_VAE),
        }
    published = wan.FACTS.memory.published
    assert {name: sum(p.numel() for p in module.parameters()) for name, module in counted.items()} == \
        published.parameters
    transformer = counted["transformer"].config
    assert published.hidden_size == transformer.num_attention_heads * transformer.attention_head_dim
    # The decoder's full-resolution stage: base_dim x the first multiplier.
    assert published.vae_channels == counted["vae"].config.base_dim * counted["vae"].config.dim_mult[0]


def test_denoising_estimate_covers_a_full_size_transformer_pass(meta_attention):  # noqa: F811
    """Wan2.1-T2V-14B at 832x480x81 in bfloat16, one guided pass (Wan runs the two halves of
    guidance one after the other, batch 1 each): what it keeps alive is within the estimate,
    and the estimate within 1.6x."""
    from diffusers import WanTransformer3DModel

    meta, dtype = torch.device("meta"), torch.bfloat16
    model, footprint = published_config(Family.WAN)
    width, height, frames = 832, 480, 81
    spec = spec_of(model, width, height, frames, guidance=5.0)
    with meta:
        transformer = WanTransformer3DModel(**wan.PUBLISHED_TRANSFORMER).to(dtype)
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)

    def call():
        batch = wan.FACTS.guidance_batch
        transformer(hidden_states=torch.empty(batch, 16, *latent, dtype=dtype, device=meta),
                    timestep=torch.zeros(batch, dtype=torch.long, device=meta),
                    encoder_hidden_states=torch.empty(batch, wan.TEXT_TOKENS, 4096, dtype=dtype, device=meta),
                    return_dict=False)

    counted = LiveBytes(*transformer.parameters(), *transformer.buffers()).run(call)
    estimated = estimate_memory(spec, model, footprint, margin=0).denoising_bytes
    # The estimate's widths are the largest any family keeps (LTX-2's, with its audio
    # cross-attention): Wan's blocks keep fewer, so it is covered by about 1.7x.
    assert counted <= estimated <= 1.8 * counted, (counted / GIB, estimated / GIB)


@pytest.mark.parametrize("width, height, frames, tiled", [
    (832, 480, 81, False), (1280, 720, 5, False), (512, 512, 9, True)])
def test_decoding_estimate_covers_a_full_size_vae_decode(width, height, frames, tiled):
    """The published VAE decodes a whole video in bfloat16 (untiled, or tiled as the engine
    sets it up): what it keeps alive is within the estimate, and the estimate within 1.6x."""
    from diffusers import AutoencoderKLWan

    from farm.engines.loading import enable_vae_tiling

    meta, dtype = torch.device("meta"), torch.bfloat16
    model, footprint = published_config(Family.WAN, backend={"vae_tiling": tiled})
    with meta:
        vae = AutoencoderKLWan(**wan.PUBLISHED_VAE).to(dtype)
    if tiled:
        enable_vae_tiling(vae)
    latents = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)

    def call():
        video = vae.decode(torch.empty(latents, dtype=dtype, device=meta), return_dict=False)[0]
        assert video.shape[2:] == (frames, height, width)

    counted = LiveBytes(*vae.parameters(), *vae.buffers()).run(call)
    estimated = estimate_memory(spec_of(model, width, height, frames, 1.0), model, footprint, margin=0).decoding_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / GIB, estimated / GIB)
