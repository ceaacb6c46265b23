"""LTX-2: everything farm knows of the family (see `farm.families` for what a family module offers).

Tasks: text-to-video (`LTX2Pipeline`) and image-to-video (`LTX2ImageToVideoPipeline`),
both with a synchronized audio track (``FACTS.audio``): one transformer denoises video
latents and audio latents together. They run on the same weights: the image-to-video
pipeline is assembled from the text-to-video pipeline's components, so a model whose
sources name one directory for both tasks loads it once.

The engine (`farm.engines.pipeline_engine`) splits a render into three timed phases: it
encodes the prompt with `encode_prompt` (the pipeline's own Gemma 3 encoding), runs the
pipeline to latents, and decodes its output with `decode_output`. With
``output_type="latent"`` the pipelines return a pair, video latents (B, C, F, H, W) and
audio latents (B, C, L, M), both already unpacked and denormalised; `decode_output`
repeats what ``__call__`` does with them for any other output type - the video VAE's
decode (with its decode noise when the VAE is timestep-conditioned), the audio VAE's
decode to a mel spectrogram and the vocoder - and cuts the waveform to the video's
duration (`decode_audio`). `decode_latents` is the video half alone.

Guidance: the family's published model is LTX-2 (2.0); `call_kwargs` asks for its
guidance - classifier-free guidance only, one batch of two, as every family's - where the
pipeline's own defaults are LTX-2.3's (spatio-temporal and modality-isolation guidance,
two more transformer passes a step, and guidance rescaling).

Preemption: not supported; `resumable_pipelines()` is empty, so the engine reports the
model as not preemptible and the scheduler never preempts its renders. The audio latents
are denoised alongside the video's, by a ``copy.deepcopy`` of the pipeline's scheduler
made inside ``__call__``, and neither the audio latents nor that scheduler can be reached
or restored from outside the call:

- ``callback_on_step_end`` may only name ``_callback_tensor_inputs`` (``latents``,
  ``prompt_embeds``, ``negative_prompt_embeds``) and the loop takes back only those, so a
  checkpoint cannot capture the audio latents after step k (the callback sees the video's
  alone); a resumed call could only hand them in as ``audio_latents``, which the pipeline
  takes for denormalised latents and normalises again, where the loop's are normalised;
- `farm.engines.checkpoint.ResumableDenoising` wraps ``set_timesteps`` and ``step`` as
  attributes of the scheduler instance, closures over that instance's bound methods. The
  deep copy keeps them (functions are copied by reference), so the audio scheduler's
  ``set_timesteps`` and ``step`` would run on the video scheduler: its timesteps set twice
  and its step index advanced twice a step, while the audio scheduler kept its 1000
  default timesteps (checked: a deep copy of a wrapped scheduler sets the original's).

Resuming would take a pipeline loop of farm's own, which the engine deliberately does not
have. Cancellation works as for every family: the engine's step callback ends the loop,
and nothing is decoded.

Backends: the transformer takes the latent frames, height and width and the frame rate as
plain numbers and its rotary coordinates as tensors; the audio stream runs inside the same
transformer call. With ``backend.vae_tiling`` the video VAE decodes in spatial and
temporal tiles; the audio VAE and the vocoder always decode the whole track (a few
hundred mel frames).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from farm.domain.limits import ModelLimits, RenderDefaults
from farm.domain.spec import Task
from farm.families import (
    DecodedClip,
    Family,
    FamilyFacts,
    LatentCompression,
    MemoryFacts,
    PipelineSizes,
    StepCarry,
    TinyModel,
    tiny_words,
)

if TYPE_CHECKING:
    import torch
    from diffusers import LTX2Pipeline
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image

    from farm.domain.engine import EngineRequest

FAMILY = Family.LTX_2

# The video VAE's tiled decode (diffusers' defaults for AutoencoderKLLTX2Video): 512 x 512
# pixels, 16 + 1 frames.
_DECODE_TILE = (17, 512, 512)
# LTX-2's rotary positions put a frame at its time in seconds over `pos_embed_max_pos`,
# 20 s (transformer config): the positions the model was trained on end 20 s in, which is
# the "up to 20 seconds" of the model card. At the default 24 fps that is 480 frames
# after the first: 481 = 8 x 60 + 1.
_MAX_SECONDS = 20
# Text tokens: the pipeline pads every prompt to 1024 Gemma tokens (its
# `max_sequence_length`, as the reference ltx-pipelines), and the connectors fill the
# padding with learned registers, so the transformer always cross-attends to 1024.
MAX_SEQUENCE_LENGTH = 1024

# The published LTX-2 (Lightricks/LTX-2, version 2.0): the diffusers config kwargs of each
# component (diffusers' conversion script; Gemma 3 12B's text config), what the memory facts
# below were counted from and what benchmarks/engine_step.py builds with random weights.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "transformer": dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
        attention_head_dim=128, cross_attention_dim=4096, vae_scale_factors=(8, 32, 32), pos_embed_max_pos=20,
        base_height=2048, base_width=2048, gated_attn=False, cross_attn_mod=False, audio_in_channels=128,
        audio_out_channels=128, audio_patch_size=1, audio_patch_size_t=1, audio_num_attention_heads=32,
        audio_attention_head_dim=64, audio_cross_attention_dim=2048, audio_scale_factor=4,
        audio_pos_embed_max_pos=20, audio_sampling_rate=16000, audio_hop_length=160, audio_gated_attn=False,
        audio_cross_attn_mod=False, num_layers=48, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=3840, attention_bias=True,
        attention_out_bias=True, rope_theta=10000.0, rope_double_precision=True, causal_offset=1,
        timestep_scale_multiplier=1000, cross_attn_timestep_scale_multiplier=1000, rope_type="split",
        use_prompt_embeddings=True, perturbed_attn=False,
    ),
    # LTX2TextConnectors: Gemma's 48 layers' and its embeddings' hidden states (49 x 3840) in.
    "connectors": dict(
        caption_channels=3840, text_proj_in_factor=49, video_connector_num_attention_heads=30,
        video_connector_attention_head_dim=128, video_connector_num_layers=2,
        video_connector_num_learnable_registers=128, video_gated_attn=False, audio_connector_num_attention_heads=30,
        audio_connector_attention_head_dim=128, audio_connector_num_layers=2,
        audio_connector_num_learnable_registers=128, audio_gated_attn=False, connector_rope_base_seq_len=4096,
        rope_theta=10000.0, rope_double_precision=True, causal_temporal_positioning=False, rope_type="split",
        per_modality_projections=False, proj_bias=False,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(256, 512, 1024, 2048),
        decoder_block_out_channels=(256, 512, 1024), layers_per_block=(4, 6, 6, 2, 2),
        decoder_layers_per_block=(5, 5, 5, 5), spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "spatiotemporal"), upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2), timestep_conditioning=False, patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6,
        encoder_causal=True, decoder_causal=False, encoder_spatial_padding_mode="zeros",
        decoder_spatial_padding_mode="reflect", spatial_compression_ratio=32, temporal_compression_ratio=8,
    ),
    "audio_vae": dict(
        base_channels=128, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=None,
        in_channels=2, resolution=256, latent_channels=8, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=64,
        double_z=True,
    ),
    "vocoder": dict(
        in_channels=128, hidden_channels=1024, out_channels=2, upsample_kernel_sizes=[16, 15, 8, 4, 4],
        upsample_factors=[6, 5, 2, 2, 2], resnet_kernel_sizes=[3, 7, 11], resnet_dilations=[[1, 3, 5]] * 3,
        act_fn="leaky_relu", leaky_relu_negative_slope=0.1, antialias=False, final_act_fn="tanh", final_bias=True,
        output_sampling_rate=24000,
    ),
    # The stage-1 scheduler (FlowMatchEulerDiscreteScheduler), as the tiny model's.
    "scheduler": dict(base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05,
                      shift_terminal=0.1, use_dynamic_shifting=True),
    # google/gemma-3-12b-it (Gemma3ForConditionalGeneration's Gemma3Config): 48 layers of width 3840.
    "text_encoder": dict(
        text_config=dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=256, vocab_size=262208, sliding_window=1024),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=896, patch_size=14),
        mm_tokens_per_image=256,
    ),
}

FACTS = FamilyFacts(
    # VAE 32x spatial and 8x temporal (its config says spatial_compression_ratio=32,
    # temporal_compression_ratio=8), transformer patch 1: sizes are multiples of 32 (the
    # pipeline refuses others) and frame counts 8k + 1 (the model card: "Width & height
    # settings must be divisible by 32. Frame count must be divisible by 8 + 1"). The
    # two-stage recipe (half size, then the 2x latent upsampler) needs multiples of 64;
    # farm runs the one-stage pipelines. Frames: 20 s at 24 fps (`_MAX_SECONDS`). Frame
    # rate: Lightricks' "up to 50 fps" for LTX-2. Width and height: at least 64, two latent
    # positions, because the VAE decoder pads its input by reflection
    # (decoder_spatial_padding_mode="reflect"), which needs more than the one position of
    # 32 pixels; at most the limits' default, 1280 - one stage at full size; larger
    # outputs are what the upsampler is for.
    # The scheduler, FlowMatchEulerDiscreteScheduler, has `shift_terminal` set (the
    # published stage-1 scheduler; the two-stage recipe turns it off for stage 2): it
    # stretches its sigmas so that the last one lands on that terminal value, dividing by
    # 1 - the last sigma; with one step the last sigma is the first, 1.0, so the timesteps
    # are NaN - the pipeline does not fail, it returns NaN latents: a black video and a NaN
    # track.
    limits=ModelLimits(size_multiple=32, min_size=64, frame_step=8, min_frames=9,
                       max_frames=_MAX_SECONDS * 24 + 1, min_steps=2, max_fps=50),
    # The reference pipelines' one-stage defaults (ltx-pipelines' constants, and the
    # diffusers docs' stage 1 for Lightricks/LTX-2): 768 x 512, 121 frames at 24 fps, 40
    # steps, guidance 4.0.
    defaults=RenderDefaults(width=768, height=512, num_frames=121, fps=24, num_inference_steps=40,
                            guidance_scale=4.0),
    min_steps_reason=("LTX-2's scheduler stretches its timesteps to a terminal value, which takes two "
                      "(with one, every timestep is NaN)"),
    compression=LatentCompression(spatial=32, temporal=8, patch=1),
    # Counted on the meta device (tests/unit/test_family_ltx2.py): at most about 2.3 copies
    # of the VAE decoder's last stage (256 channels at a quarter of the size) alive at its
    # peak, tiled or not, so 3. One transformer pass keeps about 36.3 bytes per video token and
    # unit of width alive in bfloat16 (14.2 widths in the model's dtype besides the 2 in
    # float32): more than LTX-Video's, for the audio-to-video cross-attention in every
    # block; the estimate's ACTIVATION_WIDTHS must be at least 15 to cover it. Neither the
    # audio stream (25 tokens a second at half the width) nor the 1024 text tokens
    # (cross-attention keys and values, about a fifth of a video token's bytes each, some
    # 0.06 GiB at batch 2) enter the formula: they are within its rounding and margin at
    # the default size.
    memory=MemoryFacts(
        vae_widths=3,
        decode_frames=None,  # untiled, the whole video at once
        tiled_decode_frames=_DECODE_TILE[0],
        # Parameters counted from the published configs (diffusers' LTX-2 conversion
        # script, and Gemma 3 12B's) built on torch's meta device with diffusers 0.42 and
        # transformers 5: the 19B transformer, the text connectors, the video and audio
        # VAEs, the vocoder and Gemma 3 12B (with its vision tower, which the pipeline
        # loads though it encodes text only).
        published=PipelineSizes(
            parameters={
                "transformer": 18_876_174_592,
                "connectors": 1_431_475_200,
                "text_encoder": 12_202_563_392,
                "vae": 1_222_479_601,
                "audio_vae": 53_248_146,
                "vocoder": 55_592_802,
            },
            hidden_size=4096, joint_text_tokens=0, vae_channels=256, vae_patch_size=4, vae_tile=_DECODE_TILE[1:],
            described_by="the published LTX-2 19B with Gemma 3 12B (assumed)"),
    ),
    tiny=TinyModel(
        name="ltx-2-tiny",
        directories={Task.TEXT_TO_VIDEO: "ltx-2-tiny", Task.IMAGE_TO_VIDEO: "ltx-2-tiny"},
        defaults=RenderDefaults(
            width=256, height=192, num_frames=17, fps=24, num_inference_steps=8, guidance_scale=4.0
        ),
    ),
    # The scheduler's own state is a step index (a checkpoint could keep it); what cannot
    # be resumed is the pipelines' loop (`resumable_pipelines`).
    checkpoint_schedulers={"FlowMatchEulerDiscreteScheduler": StepCarry.STEP_INDEXED},
    audio=True,
)

# The pipelines' own defaults for the decode-time noise of a timestep-conditioned VAE
# (LTX-2's is not; the path is kept as the pipeline has it), so that the engine's output
# equals the pipeline's.
DECODE_TIMESTEP = 0.0
DECODE_NOISE_SCALE = 0.0


def pipeline_classes() -> dict[Task, type[DiffusionPipeline]]:
    from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

    return {Task.TEXT_TO_VIDEO: LTX2Pipeline, Task.IMAGE_TO_VIDEO: LTX2ImageToVideoPipeline}


def resumable_pipelines() -> tuple[type[DiffusionPipeline], ...]:
    """None: the audio latents and the audio scheduler (a deep copy of the pipeline's,
    made inside ``__call__``) cannot be checkpointed nor restored, see the module's
    docstring."""
    return ()


def call_kwargs(request: EngineRequest, image: Image.Image | None) -> dict:
    """Pipeline arguments for everything but the prompt (embeddings come from `encode_prompt`)."""
    kwargs = dict(
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        # The audio's length comes from num_frames / frame_rate, and the rotary positions are in seconds.
        frame_rate=float(request.fps),
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        # LTX-2 (2.0)'s guidance: classifier-free guidance alone, at the same scale for the
        # audio. The pipeline's defaults are LTX-2.3's: spatio-temporal guidance (stg_scale
        # 1.0 at block 28), modality-isolation guidance (3.0), a higher audio guidance (7.0)
        # and rescaling (0.7). A scale of 0 turns STG off, 1 modality guidance; the audio
        # values fall back to the video's when falsy (None, 0).
        stg_scale=0.0,
        audio_stg_scale=0.0,
        modality_scale=1.0,
        audio_modality_scale=1.0,
        audio_guidance_scale=None,
        guidance_rescale=0.0,
        audio_guidance_rescale=0.0,
        spatio_temporal_guidance_blocks=None,
        # LTX-2.0 modulates its audio-video cross-attention by each stream's own timestep;
        # the pipeline's default, True, is LTX-2.3's (the other stream's). Only
        # image-to-video, whose first latent frame is at timestep 0, tells them apart.
        use_cross_timestep=False,
    )
    if request.task == Task.IMAGE_TO_VIDEO:
        # The pipeline re-compresses it as H.264 (CRF 33 for Gemma 3 text encoders, as
        # LTX-2 was trained), through PyAV.
        kwargs["image"] = image
    return kwargs


def encode_prompt(pipe: LTX2Pipeline, request: EngineRequest, device: torch.device) -> dict:
    """Prompt embeddings and masks (Gemma 3's hidden states of every layer, stacked), as
    keyword arguments for the pipeline call; the connectors run inside the call."""
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        do_classifier_free_guidance=request.guidance_scale > 1.0,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        device=device,
    )
    return dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative_embeds,
        negative_prompt_attention_mask=negative_mask,
    )


def decode_output(pipe: LTX2Pipeline, output: tuple, request: EngineRequest,
                  generator: torch.Generator) -> DecodedClip:
    """The pipeline's ``output_type="latent"`` output, (video latents, audio latents) ->
    the video (B, C, F, H, W) in [-1, 1] and the audio track, as ``__call__`` decodes them
    (the video first: it is the only draw from the generator)."""
    video_latents, audio_latents = output[0], output[1]
    video = decode_latents(pipe, video_latents, request, generator)
    audio, sample_rate = decode_audio(pipe, audio_latents, request)
    return DecodedClip(video=video, audio=audio, audio_sample_rate=sample_rate)


def decode_latents(
    pipe: LTX2Pipeline, latents: torch.Tensor, request: EngineRequest, generator: torch.Generator
) -> torch.Tensor:
    """Video latents from ``output_type="latent"`` (unpacked, denormalised, float32) ->
    video tensor (B, C, F, H, W) in [-1, 1]."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    vae = pipe.vae
    # ``__call__`` casts the normalised latents to the prompt embeddings' dtype (the text
    # encoder's), mixes in the decode noise there and only then denormalises; the latent
    # output is denormalised in float32. Where that makes a difference the latents are
    # normalised again first (exact up to float32 rounding); where it makes none (float32,
    # no decode noise) they are decoded as they are, so the frames equal the pipeline's bits.
    dtype = pipe.text_encoder.dtype
    timestep = None
    if vae.config.timestep_conditioning or dtype != latents.dtype:
        latents = pipe._normalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        latents = latents.to(dtype)
        if vae.config.timestep_conditioning:
            # Drawn from the same generator after denoising, as the pipeline does, so that
            # a seed gives the same frames through either path.
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            batch = latents.shape[0]
            timestep = torch.tensor([DECODE_TIMESTEP] * batch, device=latents.device, dtype=latents.dtype)
            scale = torch.tensor([DECODE_NOISE_SCALE] * batch, device=latents.device, dtype=latents.dtype)
            scale = scale[:, None, None, None, None]
            latents = (1 - scale) * latents + scale * noise
        latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    latents = latents.to(vae.dtype)
    return vae.decode(latents, timestep, return_dict=False)[0]


def audio_samples(request: EngineRequest, sample_rate: int) -> int:
    """Samples of a track exactly as long as the video: num_frames / fps seconds."""
    return round(request.num_frames * sample_rate / request.fps)


def decode_audio(pipe: LTX2Pipeline, latents: torch.Tensor, request: EngineRequest) -> tuple[torch.Tensor, int]:
    """Audio latents from ``output_type="latent"`` (unpacked (B, C, L, M), denormalised) ->
    the first clip's waveform (channels, samples), float32 in [-1, 1] on the CPU, and its
    sample rate (the vocoder's output rate)."""
    import torch.nn.functional as F

    latents = latents.to(pipe.audio_vae.dtype)
    mel = pipe.audio_vae.decode(latents, return_dict=False)[0]
    waveform = pipe.vocoder(mel)[0].float()
    sample_rate = int(pipe.vocoder.config.output_sampling_rate)
    # The pipeline sizes the audio latents as round(num_frames / frame_rate x 25) (16 kHz
    # mel frames of 160 samples, 4 to a latent), and the causal audio VAE decodes L latents
    # to 4L - 3 mel frames, each of which the vocoder turns into output_rate / 100 samples:
    # the track comes out up to half a latent (20 ms) longer or shorter than the video
    # from the rounding, and always 3 mel frames (30 ms) shorter from the causal start -
    # together up to 50 ms, more than a frame at 24 fps. So it is cut, or padded with
    # silence at its end (where the missing time is), to exactly the video's duration.
    samples = audio_samples(request, sample_rate)
    waveform = waveform[:, :samples]
    if waveform.shape[1] < samples:
        waveform = F.pad(waveform, (0, samples - waveform.shape[1]))
    # LTX-2's vocoder ends in tanh; one without (LTX-2.3's) may overshoot, which a PCM
    # encoder would clip anyway.
    return waveform.clamp(-1.0, 1.0).cpu(), sample_rate


def joint_text_tokens(transformer_config: Mapping[str, Any]) -> int:
    """0: text comes in through cross-attention (for video and audio alike)."""
    return 0


def vae_decode_tile(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    return FACTS.memory.published.vae_tile


def build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]:
    """A random-weight LTX-2 with the real compression: video VAE 32x spatial and 8x
    temporal, transformer patch 1; audio at 16 kHz, mel frames of 160 samples, 4 mel frames
    to a latent, and a vocoder upsampling each mel frame 240x to 24 kHz.

    One pipeline: the engine builds the image-to-video one from its components. Its text
    encoder is a tiny Gemma 3 (``Gemma3ForConditionalGeneration``, the class the pipeline
    names, with a one-layer vision tower it never uses), with a byte-pair ``GemmaTokenizer``
    trained here with the `tokenizers` library on the words of farm's tiny T5 tokenizer
    (`tokenizer`; `text_encoder` is not used).
    """
    import torch
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    gemma_tokenizer = _tiny_gemma_tokenizer(tokenizer)
    torch.manual_seed(0)
    text_width, text_layers = 32, 2
    gemma = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(
            vocab_size=len(gemma_tokenizer), hidden_size=text_width, intermediate_size=64,
            num_hidden_layers=text_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            max_position_embeddings=2 * MAX_SEQUENCE_LENGTH, sliding_window=64,
            pad_token_id=gemma_tokenizer.pad_token_id, bos_token_id=gemma_tokenizer.bos_token_id,
            eos_token_id=gemma_tokenizer.eos_token_id,
        ),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4,
        # The last three ids: no text the tokenizer makes reaches them.
        image_token_id=len(gemma_tokenizer) - 1, boi_token_id=len(gemma_tokenizer) - 2,
        eoi_token_id=len(gemma_tokenizer) - 3,
        pad_token_id=gemma_tokenizer.pad_token_id, bos_token_id=gemma_tokenizer.bos_token_id,
        eos_token_id=gemma_tokenizer.eos_token_id,
    )).eval()
    # LTX-2.0's layout (one projection of every layer's hidden states, shared by both
    # streams): width the text encoder's, heads x head dim equal to it.
    connectors = LTX2TextConnectors(
        caption_channels=text_width, text_proj_in_factor=text_layers + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=16, video_connector_num_layers=1,
        audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=16, audio_connector_num_layers=1,
        video_connector_num_learnable_registers=128, audio_connector_num_learnable_registers=128,
        rope_type="split", per_modality_projections=False,
    )
    latent_channels = 8
    # The real layout (4x4 pixel patches; spatial, temporal and two spatio-temporal 2x
    # stages down; three spatio-temporal 2x stages up), with the ratios the published config
    # states; channels tiny.
    vae = AutoencoderKLLTX2Video(
        latent_channels=latent_channels,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 16, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        timestep_conditioning=False,  # as LTX-2's
        decoder_causal=False,
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    compression = FACTS.compression
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (compression.spatial,
                                                                              compression.temporal)
    # Audio: 2 latent channels over 16 mel bins (4 latent bins); the transformer sees
    # channels x latent bins features, which is also the size of the audio VAE's latent
    # statistics (its `base_channels`).
    mel_bins, audio_latent_channels = 16, 2
    audio_features = audio_latent_channels * mel_bins // 4
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=audio_features, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=audio_latent_channels,
        mel_bins=mel_bins, sample_rate=16000, mel_hop_length=160,
    )
    # Stereo mel in, stereo waveform out, upsampling 6 x 5 x 2 x 2 x 2 = 240x as the real one.
    vocoder = LTX2Vocoder(in_channels=2 * mel_bins, hidden_channels=32, out_channels=2, output_sampling_rate=24000)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        patch_size=compression.patch,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        audio_in_channels=audio_features,
        audio_out_channels=audio_features,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=1,
        caption_channels=text_width,
        rope_type="split",
    )
    # The shift settings of the published LTX-2 (stage-1) scheduler, as LTX-Video's.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=1024,
        base_shift=0.95,
        max_image_seq_len=4096,
        max_shift=2.05,
        shift_terminal=0.1,
        use_dynamic_shifting=True,
    )
    pipe = LTX2Pipeline(
        scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=gemma, tokenizer=gemma_tokenizer,
        connectors=connectors, transformer=transformer, vocoder=vocoder,
    )
    return {Task.TEXT_TO_VIDEO: pipe}


def _tiny_gemma_tokenizer(t5_tokenizer):
    """A ``GemmaTokenizer`` (byte-pair, Gemma's special tokens and ids, a <bos> first)
    whose merges are trained with the `tokenizers` library on the whole words of farm's
    tiny T5 vocabulary, so those words are one token each."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    words = tiny_words(t5_tokenizer)
    # Gemma's own pre-processing: spaces become "▁" and stay with the word before them.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids 0..4
    bpe.train_from_iterator([" " + word for word in words], trainer=trainers.BpeTrainer(special_tokens=special, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    return GemmaTokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]],
                          model_max_length=MAX_SEQUENCE_LENGTH, add_bos_token=True)
