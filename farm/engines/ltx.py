"""LTX-Video: which diffusers pipeline serves which task, and how a request drives it.

Both tasks run on the same weights: the image-to-video pipeline is assembled from
the text-to-video pipeline's components, so a model whose sources name one
directory for both tasks loads it once.

The engine (`farm.engines.pipeline_engine`) splits a render into three timed phases:
it encodes the prompt with `encode_prompt`, runs the pipeline to latents, and
decodes them with `decode_latents`, which repeats what `LTXPipeline.__call__` does
after its denoising loop, through the pipeline's own helpers.

Preemption: both pipelines can resume from a checkpoint bitwise (FlowMatchEulerDiscreteScheduler
keeps no state between steps but its step index, which the engine sets on resume).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from farm.config import Family, Task
from farm.domain.engine import EngineRequest

FAMILY = Family.LTX_VIDEO

PIPELINE_CLASSES: dict[Task, type[DiffusionPipeline]] = {
    Task.TEXT_TO_VIDEO: LTXPipeline,
    Task.IMAGE_TO_VIDEO: LTXImageToVideoPipeline,
}

# Pipelines whose denoising a checkpoint can resume (`farm.engines.checkpoint`): given
# `latents` (packed, float32) they skip the noise draw and, for image-to-video, the image
# encode (the image's latents are the first latent frame, kept in the checkpoint's latents),
# and their loop runs over the scheduler's timesteps. The generator is drawn from again only
# by the decode noise, after the restored state.
RESUMABLE_PIPELINES: tuple[type[DiffusionPipeline], ...] = (LTXPipeline, LTXImageToVideoPipeline)

# The pipelines' own defaults for the decode-time noise of timestep-conditioned VAEs
# (LTX-Video 0.9.1+); the engine uses them so its output equals the pipeline's.
DECODE_TIMESTEP = 0.0
DECODE_NOISE_SCALE = 0.0


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


def build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]:
    """A random-weight LTX-Video with the real compression: VAE 32x spatial, 8x temporal, patch 1.

    One pipeline: the engine builds the image-to-video one from its components.

    The VAE reaches 32x as the real one does: a 4x4 pixel patchify and three
    spatio-temporal 2x stages (which also give the 8x in time). Channels are tiny.
    """
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
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (32, 8)
    transformer = LTXVideoTransformer3DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        patch_size=1,
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
