"""LTX-Video: everything farm knows of the family (see `farm.families` for what a family module offers).

Tasks: text-to-video (`LTXPipeline`) and image-to-video (`LTXImageToVideoPipeline`)
run on the same weights: the image-to-video pipeline is assembled from the
text-to-video pipeline's components, so a model whose sources name one directory
for both tasks loads it once, and backends prepare and route its one transformer once.

The engine (`farm.engines.pipeline_engine`) splits a render into three timed phases:
it encodes the prompt with `encode_prompt`, runs the pipeline to latents, and
decodes them with `decode_latents`, which repeats what `LTXPipeline.__call__` does
after its denoising loop, through the pipeline's own helpers.

Preemption: both pipelines can resume from a checkpoint bitwise. Their scheduler,
FlowMatchEulerDiscreteScheduler, keeps no state between steps but its step index,
which the engine sets on resume; its schedule (sigmas and the shift ``mu``) comes from
the spec alone, so a resumed call computes the same one. The generator is drawn from
after denoising only by the decode noise, which continues from the restored state.

Backends: the transformer takes the latent frames, height and width as plain
integers, which an ONNX graph bakes in, and the frame rate as
``rope_interpolation_scale``, a list of numbers, which becomes a graph input, so one
build serves every frame rate. With ``backend.vae_tiling`` the VAE decodes framewise too (temporal tiles).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from farm.domain.limits import ModelLimits, RenderDefaults
from farm.domain.spec import Task
from farm.families import (
    Family,
    FamilyFacts,
    LatentCompression,
    MemoryFacts,
    PipelineSizes,
    StepCarry,
    TinyModel,
)

if TYPE_CHECKING:
    import torch
    from diffusers import LTXPipeline
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image

    from farm.domain.engine import EngineRequest

FAMILY = Family.LTX_VIDEO

# The tiled decode (diffusers' defaults): 512 x 512 pixels, 16 + 1 frames.
_DECODE_TILE = (17, 512, 512)

# The published LTX-Video 2B (Lightricks/LTX-Video, 0.9.x): the diffusers config kwargs of each
# component, with random weights what benchmarks/engine_step.py builds at full size and what
# the memory facts below were counted from.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    # transformer/config.json of the 0.9.x 2B checkpoints.
    "transformer": dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
        attention_head_dim=64, cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate",
        qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
        attention_bias=True, attention_out_bias=True,
    ),
    # The 0.9.0 VAE (vae/config.json): 32x spatial, 8x temporal compression, 128 latent channels.
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(128, 256, 512, 512),
        decoder_block_out_channels=(128, 256, 512, 512), layers_per_block=(4, 3, 3, 3, 4),
        decoder_layers_per_block=(4, 3, 3, 3, 4), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=4,
        patch_size_t=1, resnet_norm_eps=1e-6, scaling_factor=1.0, encoder_causal=True, decoder_causal=False,
    ),
    # scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler).
    "scheduler": dict(base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096, max_shift=2.05,
                      shift_terminal=0.1, use_dynamic_shifting=True),
    # google/t5-v1_1-xxl's encoder (T5EncoderModel's T5Config).
    "text_encoder": dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, pad_token_id=0,
        eos_token_id=1,
    ),
}

FACTS = FamilyFacts(
    # VAE 32x spatial and 8x temporal, transformer patch 1: sizes are multiples of 32
    # and frame counts 8k + 1. The scheduler, FlowMatchEulerDiscreteScheduler, has
    # `shift_terminal` set: it stretches its sigmas so that the last one lands on that
    # terminal value, dividing by 1 - the last sigma; with one step the last sigma is the
    # first, 1.0, so the timesteps are NaN and the pipeline fails with an IndexError.
    limits=ModelLimits(size_multiple=32, frame_step=8, min_frames=9, max_frames=257, min_steps=2),
    defaults=RenderDefaults(),
    min_steps_reason="LTX-Video's scheduler stretches its timesteps to a terminal value, which takes two",
    compression=LatentCompression(spatial=32, temporal=8, patch=1),
    # Counted on the meta device (tests/unit/test_memory.py): about 6 copies of the VAE
    # decoder's last stage alive at its peak; in a transformer block 12.1 hidden-state
    # widths in the model's dtype and 2.0 in float32 (the rotary tables, cos and sin for
    # every token), within the estimate's widths for every family.
    memory=MemoryFacts(
        vae_widths=6,
        decode_frames=None,  # untiled, the whole video at once
        tiled_decode_frames=_DECODE_TILE[0],
        # Parameters counted from the published config (`PUBLISHED_CONFIGS`) built on
        # torch's meta device with diffusers 0.42 and transformers.
        published=PipelineSizes(
            parameters={"transformer": 1_923_385_472, "text_encoder": 4_762_310_656, "vae": 419_193_649},
            hidden_size=2048, joint_text_tokens=0, vae_channels=128, vae_patch_size=4, vae_tile=_DECODE_TILE[1:],
            described_by="the published LTX-Video 2B with T5-XXL (assumed)"),
    ),
    tiny=TinyModel(
        name="ltx-video-tiny",
        directories={Task.TEXT_TO_VIDEO: "ltx-video-tiny", Task.IMAGE_TO_VIDEO: "ltx-video-tiny"},
        defaults=RenderDefaults(
            width=256, height=256, num_frames=17, fps=24, num_inference_steps=8, guidance_scale=3.0
        ),
    ),
    checkpoint_schedulers={"FlowMatchEulerDiscreteScheduler": StepCarry.STEP_INDEXED},
)

# The pipelines' own defaults for the decode-time noise of timestep-conditioned VAEs
# (LTX-Video 0.9.1+); the engine uses them so its output equals the pipeline's.
DECODE_TIMESTEP = 0.0
DECODE_NOISE_SCALE = 0.0


def pipeline_classes() -> dict[Task, type[DiffusionPipeline]]:
    from diffusers import LTXImageToVideoPipeline, LTXPipeline

    return {Task.TEXT_TO_VIDEO: LTXPipeline, Task.IMAGE_TO_VIDEO: LTXImageToVideoPipeline}


def resumable_pipelines() -> tuple[type[DiffusionPipeline], ...]:
    """Given `latents` (packed, float32) both skip the noise draw and, for image-to-video,
    the image encode (the image's latents are the first latent frame, kept in the
    checkpoint's latents), and their loop runs over the scheduler's timesteps."""
    from diffusers import LTXImageToVideoPipeline, LTXPipeline

    return (LTXPipeline, LTXImageToVideoPipeline)


def call_kwargs(request: EngineRequest, image: Image.Image | None) -> dict:
    """Pipeline arguments for everything but the prompt (embeddings come from `encode_prompt`)."""
    kwargs = dict(
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        frame_rate=request.fps,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
    )
    if request.task == Task.IMAGE_TO_VIDEO:
        kwargs["image"] = image
    return kwargs


def encode_prompt(pipe: LTXPipeline, request: EngineRequest, device: torch.device) -> dict:
    """Prompt embeddings and masks, as keyword arguments for the pipeline call."""
    embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        do_classifier_free_guidance=request.guidance_scale > 1.0,
        device=device,
    )
    return dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative_embeds,
        negative_prompt_attention_mask=negative_mask,
    )


def decode_latents(
    pipe: LTXPipeline, latents: torch.Tensor, request: EngineRequest, generator: torch.Generator
) -> torch.Tensor:
    """Packed latents from `output_type="latent"` -> video tensor (B, C, F, H, W) in [-1, 1]."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    latent_frames = (request.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
    latent_height = request.height // pipe.vae_spatial_compression_ratio
    latent_width = request.width // pipe.vae_spatial_compression_ratio
    latents = pipe._unpack_latents(
        latents,
        latent_frames,
        latent_height,
        latent_width,
        pipe.transformer_spatial_patch_size,
        pipe.transformer_temporal_patch_size,
    )
    latents = pipe._denormalize_latents(
        latents, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor
    )
    # The pipeline runs the decoder in the prompt embeddings' dtype, i.e. the text encoder's.
    latents = latents.to(pipe.text_encoder.dtype)
    timestep = None
    if pipe.vae.config.timestep_conditioning:
        # Drawn from the same generator after denoising, as the pipeline does, so that
        # a seed gives the same frames through either path.
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timestep = torch.tensor([DECODE_TIMESTEP] * latents.shape[0], device=latents.device, dtype=latents.dtype)
        scale = torch.tensor([DECODE_NOISE_SCALE] * latents.shape[0], device=latents.device, dtype=latents.dtype)
        scale = scale[:, None, None, None, None]
        latents = (1 - scale) * latents + scale * noise
    latents = latents.to(pipe.vae.dtype)
    return pipe.vae.decode(latents, timestep, return_dict=False)[0]


def joint_text_tokens(transformer_config: Mapping[str, Any]) -> int:
    """0: text comes in through cross-attention."""
    return 0


def vae_decode_tile(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    return FACTS.memory.published.vae_tile


def build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]:
    """A random-weight LTX-Video with the real compression: VAE 32x spatial, 8x temporal, patch 1.

    One pipeline: the engine builds the image-to-video one from its components.

    The VAE reaches 32x as the real one does: a 4x4 pixel patchify and three
    spatio-temporal 2x stages (which also give the 8x in time). Channels are tiny.
    """
    import torch
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    torch.manual_seed(0)
    latent_channels = 8
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        # As in LTX-Video 0.9.1+, so the decode-noise path is exercised.
        timestep_conditioning=True,
        patch_size=4,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    compression = FACTS.compression
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (compression.spatial,
                                                                              compression.temporal)
    transformer = LTXVideoTransformer3DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        patch_size=compression.patch,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=text_encoder.config.d_model,
    )
    # The shift settings of the published LTX-Video scheduler config.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=1024,
        base_shift=0.95,
        max_image_seq_len=4096,
        max_shift=2.05,
        shift_terminal=0.1,
        use_dynamic_shifting=True,
    )
    pipe = LTXPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    return {Task.TEXT_TO_VIDEO: pipe}


def complete_context_parallel_plan(transformer: Any, plan: dict) -> dict:
    """diffusers 0.42.1's context-parallel plan of the LTX-Video transformer with the input it
    misses (`farm.engines.parallel`): the image-to-video pipeline passes a timestep per token,
    (batch, tokens) (the conditioning frame's tokens are at t = 0), which the plan leaves whole
    while it splits the tokens ("The size of tensor a (4) must match the size of tensor b (8)").
    It is split like the tokens; a timestep per sample, (batch,), stays whole."""
    if type(transformer).__name__ != "LTXVideoTransformer3DModel" or "timestep" in plan.get("", {}):
        return plan
    from diffusers.models._modeling_parallel import ContextParallelInput

    return {**plan, "": {**plan.get("", {}),
                         "timestep": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False)}}
