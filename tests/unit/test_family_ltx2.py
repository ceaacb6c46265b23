"""LTX-2 (farm.families.ltx2): the tiny model (real compression, a Gemma 3 text encoder
and tokenizer made offline, through save_pretrained and from_pretrained), renders with a
synchronized audio track as long as the video, equal to the pipeline's own output, the
limits' reasons, the engine's non-preemptible renders (progress, cancel), and the memory
facts against the published model counted on the meta device."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from farm.config import GIB, Task
from farm.domain.engine import CheckpointError, EngineRequest, RenderCancelled
from farm.domain.states import Stage
from farm.families import Family, family_facts, family_module, ltx2
from farm.planning import memory

MODEL = "ltx-2-tiny"
T2V, I2V = Task.TEXT_TO_VIDEO, Task.IMAGE_TO_VIDEO


@pytest.fixture(scope="module")
def image_bytes() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engine(engines):
    return engines[MODEL]


def request_for(engine, task: Task, image: bytes | None = None, **overrides) -> EngineRequest:
    defaults = engine.model.defaults
    fields = dict(
        render_id="r-1", attempt=1, task=task, prompt="a red fox running through a snowy forest, cinematic",
        negative_prompt="blurry", image=image if task == I2V else None,
        width=defaults.width, height=defaults.height, num_frames=defaults.num_frames, fps=defaults.fps,
        num_inference_steps=defaults.num_inference_steps, guidance_scale=defaults.guidance_scale, seed=1234,
    )
    fields.update(overrides)
    return EngineRequest(**fields)


def never() -> bool:
    return False


# The family module -------------------------------------------------------------------------


def test_the_module_is_the_registered_ltx2_family_with_audio():
    module = family_module(Family.LTX_2)
    assert module is ltx2 and module.FAMILY is Family.LTX_2
    facts = family_facts(Family.LTX_2)
    assert facts.audio is True and facts.denoiser == "transformer" and facts.uses_prompt
    assert (facts.compression.spatial, facts.compression.temporal, facts.compression.patch) == (32, 8, 1)
    limits = facts.limits
    assert (limits.size_multiple, limits.frame_step, limits.min_steps, limits.min_size) == (32, 8, 2, 64)
    assert limits.max_frames == 481 and (limits.max_frames - 1) % limits.frame_step == 0
    defaults = facts.defaults
    assert (defaults.width, defaults.height, defaults.num_frames, defaults.fps) == (768, 512, 121, 24)
    assert (defaults.num_inference_steps, defaults.guidance_scale) == (40, 4.0)
    assert ltx2.resumable_pipelines() == ()
    assert ltx2.joint_text_tokens({"num_attention_heads": 32}) == 0
    assert ltx2.vae_decode_tile({}) == (512, 512)


def test_call_kwargs_ask_for_ltx2_0_guidance_the_frame_rate_and_the_image():
    request = SimpleNamespace(task=T2V, width=256, height=192, num_frames=17, fps=25, num_inference_steps=8,
                              guidance_scale=4.0)
    kwargs = ltx2.call_kwargs(request, None)
    assert kwargs["frame_rate"] == 25.0 and isinstance(kwargs["frame_rate"], float)
    assert (kwargs["height"], kwargs["width"], kwargs["num_frames"]) == (192, 256, 17)
    # Classifier-free guidance alone (one batch of two): no STG, no modality isolation, no rescale.
    assert kwargs["stg_scale"] == kwargs["audio_stg_scale"] == 0.0
    assert kwargs["modality_scale"] == kwargs["audio_modality_scale"] == 1.0
    assert kwargs["guidance_rescale"] == kwargs["audio_guidance_rescale"] == 0.0
    assert kwargs["audio_guidance_scale"] is None and kwargs["use_cross_timestep"] is False
    assert "image" not in kwargs
    image = Image.new("RGB", (8, 8))
    assert ltx2.call_kwargs(SimpleNamespace(**{**vars(request), "task": I2V}), image)["image"] is image


# The tiny model --------------------------------------------------------------------------


def test_tiny_model_round_trips_with_real_compression_and_gemma(models_dir):
    from diffusers import DiffusionPipeline, LTX2Pipeline
    from transformers import Gemma3ForConditionalGeneration, GemmaTokenizer

    directory = models_dir / family_facts(Family.LTX_2).tiny.directories[T2V]
    pipe = DiffusionPipeline.from_pretrained(directory)
    assert type(pipe) is LTX2Pipeline
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    assert pipe.transformer.config.patch_size == pipe.transformer.config.patch_size_t == 1
    # Audio: 16 kHz mel frames of 160 samples, 4 to a latent, each mel frame 240 samples at 24 kHz.
    assert (pipe.audio_sampling_rate, pipe.audio_hop_length, pipe.audio_vae_temporal_compression_ratio) == (16000,
                                                                                                          160, 4)
    assert math.prod(pipe.vocoder.config.upsample_factors) == 240
    assert pipe.vocoder.config.output_sampling_rate == 24000
    assert isinstance(pipe.text_encoder, Gemma3ForConditionalGeneration)
    assert isinstance(pipe.tokenizer, GemmaTokenizer)
    ids = pipe.tokenizer("a red fox running in the snow").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and pipe.tokenizer.unk_token_id not in ids
    assert len(ids) == 1 + 7  # one token a word
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size < 4 * 1024 * 1024


# Rendering with audio ------------------------------------------------------------------------


@pytest.mark.parametrize("task", [T2V, I2V])
def test_render_has_an_audio_track_as_long_as_the_video(engine, image_bytes, task):
    request = request_for(engine, task, image_bytes)
    events = []
    output = engine.render(request, events.append, never)
    assert output.frames.shape == (request.num_frames, request.height, request.width, 3) and output.frames.std() > 0
    assert output.audio_sample_rate == 24000
    audio = output.audio
    assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.shape[0] == 2
    assert audio.shape[1] == round(request.num_frames / request.fps * 24000)
    assert abs(audio.shape[1] / output.audio_sample_rate - request.num_frames / request.fps) < 1 / request.fps
    assert np.all(np.abs(audio) <= 1.0) and audio.std() > 0
    assert [e.stage for e in events if e.step == 0] == [Stage.ENCODING_PROMPT, Stage.DENOISING, Stage.DECODING]


@pytest.mark.parametrize("num_frames, fps", [(9, 24), (17, 25), (25, 30), (33, 12)])
def test_audio_length_is_the_videos_at_any_frame_rate(engine, num_frames, fps):
    request = request_for(engine, T2V, width=64, height=64, num_frames=num_frames, fps=fps, num_inference_steps=2)
    output = engine.render(request, lambda progress: None, never)
    assert output.audio.shape == (2, round(num_frames / fps * 24000))


def test_decode_audio_cuts_or_pads_the_vocoders_track_to_the_video(engine):
    """The causal audio VAE and the latents' rounding leave the vocoder's track up to 50 ms
    off the video's length; what decode_audio returns is exactly the video's."""
    pipe = engine.pipeline(T2V)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.audio_vae.config.latent_channels, 25, 4, generator=generator)
    with torch.inference_mode():
        raw = pipe.vocoder(pipe.audio_vae.decode(latents, return_dict=False)[0])[0]
        assert raw.shape[1] == (4 * 25 - 3) * 240  # 23280 samples, 0.97 s
        for seconds in (0.5, 1.5):
            request = SimpleNamespace(num_frames=int(seconds * 24), fps=24)
            audio, rate = ltx2.decode_audio(pipe, latents, request)
            assert rate == 24000 and audio.shape == (2, int(seconds * 24000)) and audio.dtype == torch.float32
            kept = min(raw.shape[1], audio.shape[1])
            torch.testing.assert_close(audio[:, :kept], raw[:, :kept].clamp(-1, 1), rtol=0, atol=0)
            assert torch.all(audio[:, kept:] == 0)  # silence after a short track


@pytest.mark.parametrize("task", [T2V, I2V])
def test_engine_decode_equals_the_pipelines_own_video_and_audio(engine, image_bytes, task):
    request = request_for(engine, task, image_bytes)
    output = engine.render(request, lambda progress: None, never)

    pipe = engine.pipeline(task)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB") if task == I2V else None
    with torch.inference_mode():
        video, audio = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt,
                            **ltx2.call_kwargs(request, image), generator=torch.Generator().manual_seed(request.seed),
                            output_type="np", return_dict=False)
    from farm.engines.pipeline_engine import frames_to_uint8

    np.testing.assert_array_equal(output.frames, frames_to_uint8(video[0]))
    reference = audio[0].float().numpy()
    kept = min(reference.shape[1], output.audio.shape[1])
    assert kept > 0.9 * output.audio.shape[1]
    np.testing.assert_array_equal(output.audio[:, :kept], reference[:, :kept])
    assert np.all(output.audio[:, kept:] == 0)


def test_in_bfloat16_the_decode_still_gives_the_pipelines_frames_and_audio(models_dir):
    """In a 16-bit dtype ``__call__`` decodes latents it cast before denormalising, where the
    latent output is denormalised in float32: decode_latents normalises them again first."""
    from diffusers import LTX2Pipeline

    from farm.engines.pipeline_engine import frames_to_uint8, video_to_uint8_frames

    pipe = LTX2Pipeline.from_pretrained(models_dir / MODEL, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    request = SimpleNamespace(task=T2V, prompt="a red fox", negative_prompt="blurry", width=64, height=64,
                              num_frames=9, fps=24, num_inference_steps=3, guidance_scale=4.0)
    with torch.inference_mode():
        prompt = ltx2.encode_prompt(pipe, request, torch.device("cpu"))
        generator = torch.Generator().manual_seed(1)
        output = pipe(**ltx2.call_kwargs(request, None), **prompt, generator=generator, output_type="latent",
                      return_dict=False)
        clip = ltx2.decode_output(pipe, output, request, generator)
        video, audio = pipe(**ltx2.call_kwargs(request, None), **prompt, generator=torch.Generator().manual_seed(1),
                            output_type="np", return_dict=False)
    assert clip.video.dtype == torch.bfloat16
    frames = video_to_uint8_frames(clip.video)
    assert np.abs(frames.astype(int) - frames_to_uint8(video[0]).astype(int)).max() <= 1
    kept = min(audio.shape[-1], clip.audio.shape[-1])
    torch.testing.assert_close(clip.audio[:, :kept], audio[0].float()[:, :kept], rtol=0, atol=0)


def test_same_seed_same_audio_other_seed_other_audio(engine):
    def render(seed: int):
        request = request_for(engine, T2V, width=64, height=64, num_inference_steps=3, seed=seed)
        return engine.render(request, lambda progress: None, never)

    first, again, other = render(7), render(7), render(8)
    np.testing.assert_array_equal(first.audio, again.audio)
    np.testing.assert_array_equal(first.frames, again.frames)
    assert not np.array_equal(first.audio, other.audio)


# Limits -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_two_steps_render_and_one_is_nan_throughout(engine):
    """min_steps: with one step the scheduler's shift_terminal stretch divides by zero; the
    pipeline does not fail but denoises with NaN timesteps."""
    output = engine.render(request_for(engine, T2V, width=64, height=64, num_inference_steps=2), lambda p: None, never)
    assert output.frames.std() > 0 and np.isfinite(output.audio).all()
    output = engine.render(request_for(engine, T2V, width=64, height=64, num_inference_steps=1), lambda p: None, never)
    assert np.isnan(output.audio).any() and output.frames.std() == 0  # NaN track (then the padding), black video


def test_64_pixels_render_and_32_cannot(engine):
    """min_size: the VAE decoder pads its input by reflection, which one latent position cannot take."""
    output = engine.render(request_for(engine, T2V, width=64, height=64, num_inference_steps=2), lambda p: None, never)
    assert output.frames.shape[1:3] == (64, 64)
    with pytest.raises(RuntimeError, match="[Pp]adding"):
        engine.render(request_for(engine, T2V, width=64, height=32, num_inference_steps=2), lambda p: None, never)


# Preemption: not supported, and the engine says so -----------------------------------------


def test_the_engine_is_not_preemptible_and_never_asks(engine):
    assert engine.supports_checkpoint is False
    description = engine.describe()
    assert description["preemptible"] is False
    assert "LTX2Pipeline" in description["checkpoint"]["unsupported_reason"]
    asked = []

    def preempt() -> bool:
        asked.append(1)
        return True

    request = request_for(engine, T2V, width=64, height=64, num_inference_steps=3)
    output = engine.render(request, lambda p: None, never, should_preempt=preempt)
    assert output.frames.shape[0] == request.num_frames and asked == []
    with pytest.raises(CheckpointError, match="cannot resume"):
        engine.render(request, lambda p: None, never, resume=object())


def test_progress_every_step_and_a_cancel_mid_denoise_decodes_nothing(engine, monkeypatch):
    pipe = engine.pipeline(T2V)
    decodes = []
    for component in (pipe.vae, pipe.audio_vae):
        def counting(*args, original=component.decode, **kwargs):
            decodes.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(component, "decode", counting)
    events = []

    def stop_after_two() -> bool:
        return any(e.stage == Stage.DENOISING and e.step == 2 for e in events)

    request = request_for(engine, T2V, width=64, height=64, num_inference_steps=5)
    with pytest.raises(RenderCancelled) as cancelled:
        engine.render(request, events.append, stop_after_two)
    assert cancelled.value.step == 2 and decodes == []
    assert [e.step for e in events if e.stage == Stage.DENOISING and e.step > 0] == [1, 2]
    assert Stage.DECODING not in [e.stage for e in events]

    events.clear()
    output = engine.render(request, events.append, never)
    steps = [e for e in events if e.stage == Stage.DENOISING and e.step > 0]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5] and all(e.step_seconds > 0 for e in steps)
    assert decodes == [1, 1] and output.audio is not None


# Memory: the published model on the meta device ----------------------------------------------

# The published LTX-2 configs (diffusers' conversion script for Lightricks/LTX-2, version 2.0).
TRANSFORMER = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=128,
    cross_attention_dim=4096, vae_scale_factors=(8, 32, 32), pos_embed_max_pos=20, base_height=2048, base_width=2048,
    gated_attn=False, cross_attn_mod=False, audio_in_channels=128, audio_out_channels=128, audio_patch_size=1,
    audio_patch_size_t=1, audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
    audio_scale_factor=4, audio_pos_embed_max_pos=20, audio_sampling_rate=16000, audio_hop_length=160,
    audio_gated_attn=False, audio_cross_attn_mod=False, num_layers=48, activation_fn="gelu-approximate",
    qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=3840,
    attention_bias=True, attention_out_bias=True, rope_theta=10000.0, rope_double_precision=True, causal_offset=1,
    timestep_scale_multiplier=1000, cross_attn_timestep_scale_multiplier=1000, rope_type="split",
    use_prompt_embeddings=True, perturbed_attn=False,
)
CONNECTORS = dict(
    caption_channels=3840, text_proj_in_factor=49, video_connector_num_attention_heads=30,
    video_connector_attention_head_dim=128, video_connector_num_layers=2, video_connector_num_learnable_registers=128,
    video_gated_attn=False, audio_connector_num_attention_heads=30, audio_connector_attention_head_dim=128,
    audio_connector_num_layers=2, audio_connector_num_learnable_registers=128, audio_gated_attn=False,
    connector_rope_base_seq_len=4096, rope_theta=10000.0, rope_double_precision=True,
    causal_temporal_positioning=False, rope_type="split", per_modality_projections=False, proj_bias=False,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(256, 512, 1024, 2048),
    decoder_block_out_channels=(256, 512, 1024), layers_per_block=(4, 6, 6, 2, 2), decoder_layers_per_block=(5, 5, 5, 5),
    spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"), upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2), timestep_conditioning=False, patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6,
    encoder_causal=True, decoder_causal=False, encoder_spatial_padding_mode="zeros",
    decoder_spatial_padding_mode="reflect", spatial_compression_ratio=32, temporal_compression_ratio=8,
)
AUDIO_VAE = dict(
    base_channels=128, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=None, in_channels=2,
    resolution=256, latent_channels=8, norm_type="pixel", causality_axis="height", dropout=0.0,
    mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=64, double_z=True,
)
VOCODER = dict(
    in_channels=128, hidden_channels=1024, out_channels=2, upsample_kernel_sizes=[16, 15, 8, 4, 4],
    upsample_factors=[6, 5, 2, 2, 2], resnet_kernel_sizes=[3, 7, 11], resnet_dilations=[[1, 3, 5]] * 3,
    act_fn="leaky_relu", leaky_relu_negative_slope=0.1, antialias=False, final_act_fn="tanh", final_bias=True,
    output_sampling_rate=24000,
)
# Gemma 3 12B (google/gemma-3-12b-it): 48 layers of width 3840 - the connectors' 49 x 3840 inputs.
GEMMA_TEXT = dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=256, vocab_size=262208, sliding_window=1024)
GEMMA_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14)


def test_published_parameters_are_the_published_configs_counted_on_meta():
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    builders = {
        "transformer": lambda: LTX2VideoTransformer3DModel(**TRANSFORMER),
        "connectors": lambda: LTX2TextConnectors(**CONNECTORS),
        "vae": lambda: AutoencoderKLLTX2Video(**VAE),
        "audio_vae": lambda: AutoencoderKLLTX2Audio(**AUDIO_VAE),
        "vocoder": lambda: LTX2Vocoder(**VOCODER),
        "text_encoder": lambda: Gemma3ForConditionalGeneration(Gemma3Config(
            text_config=GEMMA_TEXT, vision_config=GEMMA_VISION, mm_tokens_per_image=256)),
    }
    published = ltx2.FACTS.memory.published
    with torch.device("meta"):
        counted = {name: sum(p.numel() for p in build().parameters()) for name, build in builders.items()}
    assert counted == published.parameters
    assert 18.5e9 < counted["transformer"] < 19.5e9  # "LTX-2 19B"
    assert published.hidden_size == TRANSFORMER["num_attention_heads"] * TRANSFORMER["attention_head_dim"]
    assert published.vae_channels == VAE["decoder_block_out_channels"][0]
    assert published.vae_patch_size == VAE["patch_size"]


def _published_model(**fields):
    from farm.config import ModelConfig

    model = ModelConfig(name="m", family=Family.LTX_2, sources={T2V: "no-such-dir"}, **fields)
    return model, memory.read_footprint(model)


def _spec(model, width, height, frames, guidance):
    from farm.domain.spec import RenderSpec
    from farm.jobs.validation import resolve_spec

    return resolve_spec(RenderSpec(model="m", task=T2V, prompt="x", width=width, height=height, num_frames=frames,
                                   guidance_scale=guidance), {"m": model})


def test_denoising_estimate_covers_a_full_size_transformer_pass(monkeypatch):
    """The published transformer at the default size, one guided pass (batch 2, video and
    audio, 1024 text tokens) in bfloat16: within the estimate, and the estimate within 1.6x."""
    from diffusers import LTX2VideoTransformer3DModel

    from tests.unit.test_memory import LiveBytes, efficient_attention

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", efficient_attention)
    meta, dtype = torch.device("meta"), torch.bfloat16
    with meta:
        transformer = LTX2VideoTransformer3DModel(**{**TRANSFORMER, "num_layers": 2}).to(dtype)
    width, height, frames, fps = 768, 512, 121, 24
    latent = ((frames - 1) // 8 + 1, height // 32, width // 32)
    audio = round(frames / fps * 25)

    def empty(*shape):
        return torch.empty(*shape, dtype=dtype, device=meta)

    def call():
        transformer(hidden_states=empty(2, math.prod(latent), 128), audio_hidden_states=empty(2, audio, 128),
                    encoder_hidden_states=empty(2, 1024, 3840), audio_encoder_hidden_states=empty(2, 1024, 3840),
                    timestep=empty(2), sigma=empty(2), encoder_attention_mask=torch.ones(2, 1024, device=meta),
                    audio_encoder_attention_mask=torch.ones(2, 1024, device=meta), num_frames=latent[0],
                    height=latent[1], width=latent[2], fps=float(fps), audio_num_frames=audio, return_dict=False)

    # One block's activations are alive at a time: two blocks keep what 48 do.
    counted = LiveBytes(*transformer.parameters(), *transformer.buffers()).run(call)
    model, footprint = _published_model()
    estimated = memory.estimate_memory(_spec(model, width, height, frames, 4.0), model, footprint,
                                       margin=0).denoising_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / GIB, estimated / GIB)


@pytest.mark.parametrize("width, height, frames, tiled", [(512, 512, 41, False), (768, 544, 41, True)])
def test_decoding_estimate_covers_a_full_size_vae_decode(width, height, frames, tiled):
    from diffusers import AutoencoderKLLTX2Video

    from farm.engines.pipeline_engine import enable_vae_tiling
    from tests.unit.test_memory import LiveBytes

    meta, dtype = torch.device("meta"), torch.bfloat16
    with meta:
        vae = AutoencoderKLLTX2Video(**VAE).to(dtype)
    if tiled:
        enable_vae_tiling(vae)
    latents = (1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)

    def call():
        video = vae.decode(torch.empty(latents, dtype=dtype, device=meta), None, return_dict=False)[0]
        assert video.shape[2:] == (frames, height, width)

    counted = LiveBytes(*vae.parameters(), *vae.buffers()).run(call)
    model, footprint = _published_model(backend={"vae_tiling": tiled})
    estimated = memory.estimate_memory(_spec(model, width, height, frames, 1.0), model, footprint,
                                       margin=0).decoding_bytes
    assert counted <= estimated <= 1.6 * counted, (counted / GIB, estimated / GIB)


def test_sizes_are_read_from_the_tiny_models_files(models_dir):
    from farm.engines.tiny import tiny_model_configs

    model = next(m for m in tiny_model_configs(models_dir) if m.name == MODEL)
    sizes = memory.read_footprint(model).for_task(T2V)
    assert set(sizes.parameters) == {"transformer", "connectors", "text_encoder", "vae", "audio_vae", "vocoder"}
    assert (sizes.hidden_size, sizes.vae_channels, sizes.vae_patch_size, sizes.joint_text_tokens) == (32, 8, 4, 0)
