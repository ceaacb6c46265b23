"""AnimateDiff (farm.families.animatediff): the tiny model and its round trip, the engine's
frames against the pipeline's own bitwise, the limits and why (sizes, the motion modules'
32 frames, DDIM's one step), checkpoints with DDIM and Euler, preemption inside a UNet
pass, `save_pipeline` joining an SD 1.5 checkpoint and a motion adapter, and the memory
constants against the published models on the meta device. No GPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from farm.config import ModelConfig, Task
from farm.domain.engine import DenoiseCheckpoint, EngineRequest, RenderPreempted
from farm.engines import load_engine
from farm.engines.pipeline_engine import frames_to_uint8
from farm.engines.tiny import tiny_model_configs
from farm.families import Family, StepCarry, family_facts
from farm.families import animatediff as ad

T2V = Task.TEXT_TO_VIDEO
TINY = ad.FACTS.tiny.name
PROMPT = "a red fox running through a snowy forest, cinematic"


def request(**overrides) -> EngineRequest:
    defaults = ad.FACTS.tiny.defaults
    fields = dict(render_id="r-1", attempt=1, task=T2V, prompt=PROMPT, negative_prompt="blurry", image=None,
                  width=defaults.width, height=defaults.height, num_frames=defaults.num_frames, fps=defaults.fps,
                  num_inference_steps=defaults.num_inference_steps, guidance_scale=defaults.guidance_scale, seed=1234)
    fields.update(overrides)
    return EngineRequest(**fields)


def never() -> bool:
    return False


def pipeline_frames(pipe, req: EngineRequest, **extra) -> np.ndarray:
    """The pipeline's own uint8 frames for a request, as a user of diffusers gets them."""
    with torch.inference_mode():
        frames = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width, height=req.height,
                      num_frames=req.num_frames, num_inference_steps=req.num_inference_steps,
                      guidance_scale=req.guidance_scale, generator=torch.Generator().manual_seed(req.seed),
                      output_type="np", **extra).frames[0]
    return frames_to_uint8(frames)


def model_with(models_dir, source) -> ModelConfig:
    model = next(m for m in tiny_model_configs(models_dir) if m.name == TINY)
    return model.model_copy(update={"sources": {T2V: str(source)}})


# The tiny model -----------------------------------------------------------------------------


def test_the_tiny_model_round_trips_with_the_real_compression_depth_and_frame_table(models_dir):
    from diffusers import (
        AnimateDiffPipeline,
        DDIMScheduler,
        DiffusionPipeline,
        UNetMotionModel,
    )
    from transformers import CLIPTokenizer

    from farm.engines.tiny import build_tiny_text_encoder

    directory = models_dir / ad.FACTS.tiny.directories[T2V]
    pipe = DiffusionPipeline.from_pretrained(directory)
    assert type(pipe) is AnimateDiffPipeline and type(pipe.unet) is UNetMotionModel
    # Saved without the separate adapter: the motion UNet holds its weights once.
    assert pipe.motion_adapter is None and not (directory / "motion_adapter").exists()
    assert pipe.vae_scale_factor == ad.FACTS.compression.spatial == 8
    # SD 1.5's depth: four stages, latents halved three times; the real 32-frame position table.
    assert pipe.unet.num_upsamplers == 3 == len(ad.PUBLISHED_CONFIGS["unet"]["block_out_channels"]) - 1
    assert pipe.unet.config.motion_max_seq_length == ad.MOTION_MAX_SEQ_LENGTH == ad.FACTS.limits.max_frames
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.init_noise_sigma == 1.0
    assert {k: pipe.scheduler.config[k] for k in ad.MODEL_CARD_DDIM} == ad.MODEL_CARD_DDIM
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer.model_max_length == 77
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a red fox in the snow").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "fox</w>", "in</w>", "the</w>", "snow</w>",
                      "<|endoftext|>"]
    assert pipe.text_encoder.config.max_position_embeddings == 77
    # Built again in code, it has the saved weights (every component, bit for bit).
    built = ad.build_tiny_pipelines(*build_tiny_text_encoder())[T2V]
    for name in ("unet", "vae", "text_encoder"):
        saved, fresh = getattr(pipe, name).state_dict(), getattr(built, name).state_dict()
        assert saved.keys() == fresh.keys() and all(torch.equal(saved[k], fresh[k]) for k in saved), name
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size < 2 * 1024 * 1024


# The engine against the pipeline ---------------------------------------------------------------


def test_the_engines_frames_are_the_pipelines_own_bitwise(engines):
    engine = engines[TINY]
    pipe = engine.pipeline(T2V)
    default = request()
    np.testing.assert_array_equal(engine.render(default, lambda p: None, never).frames, pipeline_frames(pipe, default))
    # Another decode chunk size is the pipeline's with that chunk size; no guidance, no negative prompt.
    chunked = request(decode_chunk_size=5, guidance_scale=1.0, negative_prompt="")
    frames = engine.render(chunked, lambda p: None, never).frames
    np.testing.assert_array_equal(frames, pipeline_frames(pipe, chunked, decode_chunk_size=5))


def test_sizes_are_any_multiple_of_8_and_frames_at_most_the_motion_table(engines):
    engine = engines[TINY]
    # 72 x 40 pixels: 9 x 5 latents, odd at every level of the UNet, which forwards the sizes.
    output = engine.render(request(width=72, height=40, num_frames=3, num_inference_steps=2), lambda p: None, never)
    assert output.frames.shape == (3, 40, 72, 3) and output.frames.std() > 0
    most = ad.FACTS.limits.max_frames
    output = engine.render(request(width=32, height=32, num_frames=most, num_inference_steps=2), lambda p: None,
                           never)
    assert output.frames.shape == (most, 32, 32, 3)
    # One frame more has no position in the motion modules' table.
    with pytest.raises(RuntimeError, match="size of tensor"):
        engine.render(request(width=32, height=32, num_frames=most + 1, num_inference_steps=2), lambda p: None,
                      never)


def test_one_ddim_step_returns_the_starting_noise_which_is_why_two_is_the_minimum(engines):
    """The limit's reason (`FACTS.min_steps_reason`): a lone linspace step is timestep 0."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe = engines[TINY].pipeline(T2V)
    req = request(width=32, height=32, num_frames=4)

    def latents(steps: int) -> torch.Tensor:
        with torch.inference_mode():
            return pipe(prompt=req.prompt, width=req.width, height=req.height, num_frames=req.num_frames,
                        num_inference_steps=steps, generator=torch.Generator().manual_seed(req.seed),
                        output_type="latent", return_dict=False)[0]

    noise = randn_tensor((1, 4, req.num_frames, 4, 4), generator=torch.Generator().manual_seed(req.seed))
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [0]

    def distance(steps: int) -> float:
        return float((latents(steps) - noise).norm() / noise.norm())

    # At timestep 0 DDIM's step goes back to the same alpha: it returns its input, whatever the UNet says.
    assert distance(1) < 1e-6 and distance(ad.FACTS.limits.min_steps) > 0.5


# Checkpoints ---------------------------------------------------------------------------------


def copy_with_scheduler(models_dir, tmp_path, class_name: str, **config):
    target = tmp_path / "animatediff"
    shutil.copytree(models_dir / ad.FACTS.tiny.directories[T2V], target)
    path = target / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": class_name, **config}))
    index = json.loads((target / "model_index.json").read_text())
    index["scheduler"][1] = class_name
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def preempt_and_resume(engine, req: EngineRequest, after: int) -> tuple[np.ndarray, np.ndarray]:
    """(uninterrupted frames, frames of a render preempted after `after` steps and resumed)."""
    steps = []

    def preempt() -> bool:
        return bool(steps) and steps[-1] >= after

    uninterrupted = engine.render(req, lambda p: None, never).frames
    with pytest.raises(RenderPreempted) as raised:
        engine.render(req, lambda p: steps.append(p.step), never, should_preempt=preempt)
    checkpoint = DenoiseCheckpoint.from_bytes(raised.value.checkpoint.to_bytes())
    assert checkpoint.step == after
    return uninterrupted, engine.render(req, lambda p: None, never, resume=checkpoint).frames


def test_the_schedulers_named_resume_bitwise_and_lcm_is_not_preemptible(models_dir, tmp_path):
    assert ad.FACTS.checkpoint_schedulers == {"DDIMScheduler": StepCarry.STATELESS,
                                              "EulerDiscreteScheduler": StepCarry.STEP_INDEXED}
    # AnimateDiff-Lightning's scheduler: Euler, trailing spacing (its init_noise_sigma is not 1).
    source = copy_with_scheduler(models_dir, tmp_path, "EulerDiscreteScheduler", timestep_spacing="trailing")
    engine = load_engine(model_with(models_dir, source))
    assert engine.supports_checkpoint and engine.pipeline(T2V).scheduler.init_noise_sigma != 1.0
    uninterrupted, resumed = preempt_and_resume(engine, request(num_inference_steps=4), after=2)
    np.testing.assert_array_equal(resumed, uninterrupted)
    # AnimateLCM's scheduler reads timesteps[step_index + 1], which a resumed call has cut.
    shutil.rmtree(source)
    source = copy_with_scheduler(models_dir, tmp_path, "LCMScheduler")
    engine = load_engine(model_with(models_dir, source))
    assert not engine.supports_checkpoint and "LCMScheduler" in engine.checkpoint_unsupported


def test_a_preemption_inside_the_unet_pass_resumes_from_the_step_before_bitwise(engines):
    """The engine checks before each UNet layer (a UNet has no `transformer_blocks`)."""
    engine = engines[TINY]
    req = request(num_inference_steps=4)
    uninterrupted = engine.render(req, lambda p: None, never).frames
    steps, asked = [], []

    def yes_from_the_second_question() -> bool:
        asked.append(steps[-1] if steps else 0)
        return len(asked) >= 2

    with pytest.raises(RenderPreempted) as raised:
        engine.render(req, lambda p: steps.append(p.step), never, should_preempt=yes_from_the_second_question)
    assert asked == [1, 1] and raised.value.checkpoint.step == 1  # asked again inside step 2's UNet pass
    resumed = engine.render(req, lambda p: None, never,
                            resume=DenoiseCheckpoint.from_bytes(raised.value.checkpoint.to_bytes()))
    np.testing.assert_array_equal(resumed.frames, uninterrupted)
    layers = engine._preemption_points(engine.pipeline(T2V).unet)
    assert len(layers) > 20 and not any(layer._forward_pre_hooks for layer in layers)


# save_pipeline: an SD 1.5 checkpoint + a motion adapter -> one source --------------------------


def test_save_pipeline_joins_a_checkpoint_and_a_motion_adapter(models_dir, tmp_path):
    from diffusers import (
        AnimateDiffPipeline,
        DDIMScheduler,
        MotionAdapter,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tiny = AnimateDiffPipeline.from_pretrained(models_dir / ad.FACTS.tiny.directories[T2V])
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**ad._TINY_UNET, cross_attention_dim=tiny.text_encoder.config.hidden_size)
    # An SD 1.5 checkpoint as published: PNDM scheduler, no safety checker here.
    base = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=unet, scheduler=PNDMScheduler(beta_schedule="scaled_linear",
                                                                      beta_start=0.00085, beta_end=0.012),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base.save_pretrained(tmp_path / "sd15")
    adapter = MotionAdapter(**ad._TINY_MOTION_ADAPTER)
    adapter.save_pretrained(tmp_path / "adapter")

    directory = ad.save_pipeline(str(tmp_path / "sd15"), str(tmp_path / "adapter"), tmp_path / "animatediff")
    pipe = AnimateDiffPipeline.from_pretrained(directory)
    assert pipe.motion_adapter is None and type(pipe.unet).__name__ == "UNetMotionModel"
    assert type(pipe.scheduler) is DDIMScheduler
    assert {k: pipe.scheduler.config[k] for k in ad.MODEL_CARD_DDIM} == ad.MODEL_CARD_DDIM
    # The motion UNet carries both parts' weights.
    assert torch.equal(pipe.unet.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(pipe.unet.down_blocks[0].motion_modules[0].proj_in.weight,
                       adapter.down_blocks[0].motion_modules[0].proj_in.weight)
    # A farm model of that directory renders.
    engine = load_engine(model_with(models_dir, directory))
    output = engine.render(request(width=32, height=32, num_frames=4, num_inference_steps=2), lambda p: None, never)
    assert output.frames.shape == (4, 32, 32, 3)


# Memory ---------------------------------------------------------------------------------------


def published_models():
    from diffusers import (
        AutoencoderKL,
        MotionAdapter,
        UNet2DConditionModel,
        UNetMotionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = ad.PUBLISHED_CONFIGS
    with torch.device("meta"):
        unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**configs["unet"]),
                                           MotionAdapter(**configs["motion_adapter"]), load_weights=False)
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


@pytest.fixture(scope="module")
def published():
    return published_models()


def test_published_parameters_are_the_published_configs_counted(published):
    counted = {name: sum(p.numel() for p in model.parameters()) for name, model in published.items()}
    assert counted == ad.FACTS.memory.published.parameters
    assert ad.activation_width(ad.PUBLISHED_CONFIGS["unet"]) == ad.FACTS.memory.published.hidden_size
    assert ad.vae_decode_tile(ad.PUBLISHED_CONFIGS["vae"]) == ad.FACTS.memory.published.vae_tile


def test_the_tiny_models_files_are_read_for_the_estimate(models_dir):
    from farm.planning.memory import read_footprint

    model = next(m for m in tiny_model_configs(models_dir) if m.name == TINY)
    sizes = read_footprint(model).for_task(T2V)
    assert sizes.described_by == str(models_dir / ad.FACTS.tiny.directories[T2V])
    # The motion modules are in the UNet, counted once.
    assert set(sizes.parameters) == {"unet", "text_encoder", "vae"}
    assert (sizes.joint_text_tokens, sizes.vae_channels, sizes.vae_patch_size, sizes.vae_tile) == (0, 4, 1, (512, 512))


def published_spec(width: int, height: int, frames: int, guidance: float, **model):
    from farm.domain.spec import RenderSpec
    from farm.jobs.validation import resolve_spec
    from farm.planning.memory import read_footprint

    config = ModelConfig(name="m", family=Family.ANIMATEDIFF, sources={T2V: "no-such-dir"}, **model)
    spec = resolve_spec(RenderSpec(model="m", task=T2V, prompt="x", width=width, height=height, num_frames=frames,
                                   guidance_scale=guidance), {"m": config})
    return spec, config, read_footprint(config)


def test_denoising_estimate_covers_a_full_size_unet_pass(published, monkeypatch):
    """The published motion UNet, one guided pass (batch 2) at the defaults in bfloat16: the
    activations it keeps alive are within the estimate, and the estimate within 1.6x."""
    from farm.planning.memory import estimate_memory
    from tests.unit.test_memory import LiveBytes, efficient_attention

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", efficient_attention)
    meta, dtype = torch.device("meta"), torch.bfloat16
    unet = published["unet"].to(dtype)
    defaults = family_facts(Family.ANIMATEDIFF).defaults
    width, height, frames = defaults.width, defaults.height, defaults.num_frames
    spec, config, footprint = published_spec(width, height, frames, guidance=7.5)

    def call():
        out = unet(torch.empty(2, 4, frames, height // 8, width // 8, dtype=dtype, device=meta),
                   torch.zeros((), dtype=torch.long, device=meta),
                   encoder_hidden_states=torch.empty(2 * frames, 77, 768, dtype=dtype, device=meta),
                   return_dict=False)[0]
        assert out.shape == (2, 4, frames, height // 8, width // 8)

    counted = LiveBytes(*unet.parameters(), *unet.buffers()).run(call)
    estimated = estimate_memory(spec, config, footprint, margin=0).denoising_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / 2**30, estimated / 2**30)


@pytest.mark.parametrize("width, height, frames, tiled", [(512, 512, 24, False), (1024, 768, 16, True)])
def test_decoding_estimate_covers_a_full_size_vae_decode(published, width, height, frames, tiled):
    """The pipeline's decode (16-frame chunks) with the published VAE in bfloat16, untiled or
    tiled as the engine sets it up: within the estimate, and the estimate within 1.6x."""
    from diffusers import AnimateDiffPipeline

    from farm.engines.loading import enable_vae_tiling
    from farm.planning.memory import estimate_memory
    from tests.unit.test_memory import LiveBytes

    meta, dtype = torch.device("meta"), torch.bfloat16
    vae = published["vae"].to(dtype)
    vae.disable_tiling()
    if tiled:
        enable_vae_tiling(vae)

    class Pipe:  # what AnimateDiffPipeline.decode_latents reads of its pipeline
        pass

    pipe = Pipe()
    pipe.vae = vae

    def call():
        latents = torch.empty(1, 4, frames, height // 8, width // 8, dtype=dtype, device=meta)
        video = AnimateDiffPipeline.decode_latents(pipe, latents, ad.DECODE_CHUNK_SIZE)
        assert video.shape == (1, 3, frames, height, width)

    counted = LiveBytes(*vae.parameters(), *vae.buffers()).run(call)
    spec, config, footprint = published_spec(width, height, frames, 1.0, backend={"vae_tiling": tiled})
    estimated = estimate_memory(spec, config, footprint, margin=0).decoding_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / 2**30, estimated / 2**30)
