"""Stable Video Diffusion: everything farm knows of the family (see `farm.families` for what a family module offers).

Tasks: image-to-video only (`StableVideoDiffusionPipeline`). The pipeline takes no text:
it conditions on the image twice, through its CLIP ViT-H/14 image embedding (cross-attention)
and through its VAE latents (concatenated to every frame's noisy latents), and on three
numbers, the frame rate, the motion bucket and the noise augmentation, which the UNet takes
as added time embeddings. ``FACTS.uses_prompt`` is False, `encode_prompt` gives nothing, and
a request's `motion_bucket_id`, `noise_aug_strength` and `decode_chunk_size` (None: the
defaults below, with `check_motion_fields` stating their limits) go into `call_kwargs`.
There is no transformer: the denoiser is the pipeline's ``unet`` (``FACTS.denoiser``).

The engine (`farm.engines.pipeline_engine`) splits a render into three timed phases:
`encode_prompt` (nothing to do), the pipeline call to latents (including the CLIP and
VAE encodes of the image), and `decode_latents` (through `decode_output`: the pipeline
returns its latents bare, not in a tuple), which is what the pipeline does after its loop:
the temporal VAE decodes ``decode_chunk_size`` frames at a time, in the VAE's dtype.

Guidance: the pipeline guides each frame with its own scale, rising linearly from
``min_guidance_scale`` on the first frame (the image itself) to ``max_guidance_scale`` on the
last. A request's `guidance_scale` is that maximum; the minimum stays at the pipeline's 1.0
(`MIN_GUIDANCE_SCALE`). Guidance is off when the maximum is 1 or less.

Preemption: the pipeline resumes from a checkpoint bitwise with its EulerDiscreteScheduler.
Its step and ``scale_model_input`` read only its sigmas at its step index (which the engine
sets on resume), and with the pipeline's ``s_churn`` of 0 it draws no noise. Its
``init_noise_sigma`` is sqrt(700² + 1), by which the pipeline multiplies given latents; the
engine has the resumed call see 1. The pipeline's set-up draws from the generator once,
before the latents: the noise augmentation of the image (``randn`` of the image's shape).
That is the generator's first draw in every attempt, so a resumed attempt, whose generator
is fresh from the seed, draws the same noise and encodes the same image latents; given
latents, it draws nothing more. The UNet has no ``transformer_blocks``: a preemption waits
for the end of the step.

Backends: the denoiser is a UNet taking (batch, frames, 8, height / 8, width / 8) latents,
a (batch, 1, 1024) image embedding and (batch, 3) added time ids. The temporal VAE has no
tiled decode (``backend.vae_tiling`` cannot be enabled for it); `decode_chunk_size` is
what bounds its memory.
"""

from __future__ import annotations

import math
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
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image

    from farm.domain.engine import EngineRequest

FAMILY = Family.STABLE_VIDEO_DIFFUSION

# The motion bucket conditions how much moves. Stability's reference sampling script
# (generative-models, scripts/sampling/simple_video_sample.py) warns above 255 ("High motion
# bucket! This may lead to suboptimal performance"); 0 is the least motion.
MOTION_BUCKET_RANGE = (0, 255)
# The reference script's and the pipeline's default.
DEFAULT_MOTION_BUCKET = 127
# Noise added to the conditioning image (in [-1, 1]) before it is encoded, times a standard
# normal draw: at 1 the noise is as strong as half the image's whole range and the image is
# all but gone, so more is refused. The model card and the pipeline's docs advise keeping it
# small: more makes the video resemble the image less and move more; the reference script
# suggests raising it a little for images not at the trained 1024 x 576.
NOISE_AUG_RANGE = (0.0, 1.0)
# The reference script's `cond_aug` and the pipeline's default.
DEFAULT_NOISE_AUG = 0.02
# Frames the temporal VAE decodes in one batch. The pipeline's own default is the whole clip,
# but the decoder keeps 8 copies of its full-resolution stage (128 channels) alive per frame
# (counted on the meta device, tests/unit/test_family_stable_video_diffusion.py): at
# 1024 x 576 in bfloat16, 16 GiB for 14 frames and 28 GiB for SVD-XT's 25. 14 is the reference
# script's `decoding_t` ("This eats most VRAM. Reduce if necessary"): SVD's whole 14-frame clip
# in one batch, SVD-XT's 25 in two (14 + 11), whatever the clip's length. A chunk smaller than
# the clip decodes its frames without temporal context across the seam.
DEFAULT_DECODE_CHUNK_SIZE = 14
# The pipeline's `min_guidance_scale`: the first frame, the image itself, is not guided.
MIN_GUIDANCE_SCALE = 1.0
# SVD-XT's training length, and the most frames a render may ask for; SVD (img2vid) was
# trained on 14 (a model config for it lowers `max_frames`).
SVD_XT_FRAMES = 25
# The temporal VAE has no tiled decode: its "tile" is the whole frame, at most this big.
_FULL_FRAME = (1024, 1024)

FACTS = FamilyFacts(
    limits=ModelLimits(
        # VAE 8x; the pipeline refuses sizes that are not multiples of 8. The UNet halves the
        # latents three times (64 pixels a side per deepest position), but forwards the skip
        # connections' sizes to its upsamplers when a level is odd, so any multiple of 8
        # renders (checked on the tiny model, which halves as often); the trained 1024 x 576
        # is a multiple of 64.
        size_multiple=8,
        # One latent position at the UNet's deepest level.
        min_size=64,
        # Trained at 1024 x 576 (the reference script warns at any other size); either
        # orientation, no side beyond the trained long side.
        max_width=1024,
        max_height=1024,
        # A 2D encoder and a decoder with temporal layers but no temporal compression:
        # every frame has its own latent, so any count.
        frame_step=1,
        # One frame is the image again; the temporal layers mix two or more.
        min_frames=2,
        max_frames=SVD_XT_FRAMES,
        # The UNet is conditioned on fps - 1; the reference script warns above 30 for it.
        max_fps=31,
    ),
    # SVD-XT's model card and the pipeline: 1024 x 576, 25 frames, 25 Euler steps, guidance
    # rising to 3.0; 7 fps (the pipeline's default, and the docs' export rate).
    defaults=RenderDefaults(
        width=1024, height=576, num_frames=SVD_XT_FRAMES, fps=7, num_inference_steps=25, guidance_scale=3.0
    ),
    # Karras sigmas from 700 to 0.002: one step goes from the first to 0 and returns the
    # v-prediction's x0 estimate, which renders.
    min_steps_reason=None,
    # A 2D VAE with 8x spatial compression, none in time; the UNet works on latent positions
    # directly (no patches).
    compression=LatentCompression(spatial=8, temporal=1, patch=1),
    memory=MemoryFacts(
        # Counted on the meta device (tests/unit/test_family_stable_video_diffusion.py): the
        # decode of a chunk keeps exactly 8 copies of the decoder's last stage (128 channels
        # at full resolution) per frame alive at its peak.
        vae_widths=8,
        decode_frames=DEFAULT_DECODE_CHUNK_SIZE,
        # No tiled decode: the same as untiled.
        tiled_decode_frames=DEFAULT_DECODE_CHUNK_SIZE,
        # Parameters counted from the published configs (`PUBLISHED_CONFIGS`) built on torch's
        # meta device with diffusers 0.42 and transformers 5: the SVD-XT UNet, the temporal
        # VAE (2D encoder, temporal decoder) and OpenCLIP ViT-H/14's vision tower.
        published=PipelineSizes(
            parameters={"unet": 1_524_623_082, "image_encoder": 632_076_800, "vae": 97_742_847},
            # A UNet has no single width. Counted on the meta device, a guided pass keeps alive
            # 28 copies of its first stage (320 channels) per latent position in bfloat16, the
            # bytes of 530 channels at the estimate's 34 bytes a channel (13 in bfloat16 + 2 in
            # float32): the full-resolution stage's skip connections, its 320-channel resnets
            # and attention blocks with their 1280-wide feed-forward. `activation_width` (twice
            # the first stage's channels, 640) covers that with 1.2x to spare.
            hidden_size=640, joint_text_tokens=0, vae_channels=128, vae_patch_size=1, vae_tile=_FULL_FRAME,
            described_by="the published Stable Video Diffusion XT (img2vid-xt) (assumed)"),
    ),
    tiny=TinyModel(
        name="stable-video-diffusion-tiny",
        directories={Task.IMAGE_TO_VIDEO: "stable-video-diffusion-tiny"},
        # SVD-XT's 16:9-ish landscape at 1/8 a side, rounded to multiples of 64; fewer frames and steps.
        defaults=RenderDefaults(width=128, height=64, num_frames=8, fps=7, num_inference_steps=8,
                                guidance_scale=3.0),
    ),
    checkpoint_schedulers={"EulerDiscreteScheduler": StepCarry.STEP_INDEXED},
    denoiser="unet",
    uses_prompt=False,
    lora=False,  # the Stable Video Diffusion pipeline has no LoRA loader
)

# The published models' configs (their config.json files), for counting their sizes on the
# meta device and for the tiny model's scheduler.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-video-diffusion-img2vid-xt, unet/config.json (img2vid: num_frames 14).
    "unet": dict(
        sample_size=96, in_channels=8, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024,
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=768, transformer_layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
        num_frames=SVD_XT_FRAMES,
    ),
    # vae/config.json.
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=2, sample_size=768,
        scaling_factor=0.18215, force_upcast=True,
    ),
    # image_encoder/config.json (CLIPVisionModelWithProjection).
    "image_encoder": dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
    ),
    # scheduler/scheduler_config.json: EDM's Karras sigmas over v-prediction, continuous timesteps.
    "scheduler": dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    ),
}


def check_motion_fields(
    motion_bucket_id: int | None, noise_aug_strength: float | None, decode_chunk_size: int | None, num_frames: int
) -> list[tuple[str, str]]:
    """(field, reason) for each of a request's motion fields that the family cannot take;
    empty when all can. None is a field left to its default (`DEFAULT_MOTION_BUCKET`,
    `DEFAULT_NOISE_AUG`, `DEFAULT_DECODE_CHUNK_SIZE`) and always fine."""
    problems = []
    low, high = MOTION_BUCKET_RANGE
    if motion_bucket_id is not None:
        if isinstance(motion_bucket_id, bool) or not isinstance(motion_bucket_id, int):
            problems.append(("motion_bucket_id", f"must be a whole number in {low}..{high}"))
        elif not low <= motion_bucket_id <= high:
            reason = (f"{motion_bucket_id} is outside {low}..{high} (Stable Video Diffusion's motion buckets; "
                      f"{DEFAULT_MOTION_BUCKET} by default, higher moves more)")
            problems.append(("motion_bucket_id", reason))
    low_noise, high_noise = NOISE_AUG_RANGE
    if noise_aug_strength is not None:
        if isinstance(noise_aug_strength, bool) or not isinstance(noise_aug_strength, int | float):
            problems.append(("noise_aug_strength", f"must be a number in {low_noise:g}..{high_noise:g}"))
        elif not (math.isfinite(noise_aug_strength) and low_noise <= noise_aug_strength <= high_noise):
            reason = (f"{noise_aug_strength:g} is outside {low_noise:g}..{high_noise:g} (noise added to the image; "
                      f"{DEFAULT_NOISE_AUG:g} by default, keep it small: more resembles the image less)")
            problems.append(("noise_aug_strength", reason))
    if decode_chunk_size is not None:
        if isinstance(decode_chunk_size, bool) or not isinstance(decode_chunk_size, int):
            problems.append(("decode_chunk_size", f"must be a whole number in 1..{num_frames} (the frame count)"))
        elif not 1 <= decode_chunk_size <= num_frames:
            reason = (f"{decode_chunk_size} is outside 1..{num_frames} (frames the VAE decodes at once, at most "
                      "the frame count)")
            problems.append(("decode_chunk_size", reason))
    return problems


def motion_values(request: EngineRequest) -> tuple[int, float, int]:
    """(motion_bucket_id, noise_aug_strength, decode_chunk_size) of a request, its Nones
    (or an older request without the fields) given the family's defaults."""
    motion = getattr(request, "motion_bucket_id", None)
    noise = getattr(request, "noise_aug_strength", None)
    chunk = getattr(request, "decode_chunk_size", None)
    return (
        DEFAULT_MOTION_BUCKET if motion is None else motion,
        DEFAULT_NOISE_AUG if noise is None else noise,
        min(DEFAULT_DECODE_CHUNK_SIZE, request.num_frames) if chunk is None else chunk,
    )


def pipeline_classes() -> dict[Task, type[DiffusionPipeline]]:
    from diffusers import StableVideoDiffusionPipeline

    return {Task.IMAGE_TO_VIDEO: StableVideoDiffusionPipeline}


def resumable_pipelines() -> tuple[type[DiffusionPipeline], ...]:
    """Given `latents` it draws no noise for them and multiplies them by init_noise_sigma (the
    engine makes the resumed call see 1); its set-up's one draw, the image's noise
    augmentation, is the generator's first in every attempt, so a resumed call encodes the
    same image latents; its loop runs over the scheduler's timesteps, and Euler's step reads
    only its sigmas at its step index and draws nothing (``s_churn`` 0)."""
    from diffusers import StableVideoDiffusionPipeline

    return (StableVideoDiffusionPipeline,)


def call_kwargs(request: EngineRequest, image: Image.Image | None) -> dict:
    """Pipeline arguments: the image, the size, the frame rate it conditions on (the pipeline
    passes fps - 1 to the UNet), the motion fields, and `guidance_scale` as the last frame's
    (``max_guidance_scale``). Raises ValueError for motion fields `check_motion_fields` refuses."""
    if request.task != Task.IMAGE_TO_VIDEO:
        raise ValueError(f"Stable Video Diffusion renders image-to-video only, not {request.task.value}")
    motion, noise, chunk = motion_values(request)
    problems = check_motion_fields(motion, noise, chunk, request.num_frames)
    if problems:
        raise ValueError("; ".join(f"{field}: {reason}" for field, reason in problems))
    return dict(
        image=image,
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        num_inference_steps=request.num_inference_steps,
        min_guidance_scale=MIN_GUIDANCE_SCALE,
        max_guidance_scale=request.guidance_scale,
        fps=request.fps,
        motion_bucket_id=motion,
        noise_aug_strength=noise,
        decode_chunk_size=chunk,
    )


def encode_prompt(pipe: StableVideoDiffusionPipeline, request: EngineRequest, device: torch.device) -> dict:
    """Nothing: the pipeline takes no text, and encodes its image (CLIP and VAE) inside its call."""
    return {}


def decode_output(
    pipe: StableVideoDiffusionPipeline, output: torch.Tensor, request: EngineRequest, generator: torch.Generator
) -> torch.Tensor:
    """The pipeline call's output to `decode_latents`: with ``return_dict=False`` this pipeline
    returns its latents (B, F, C, H, W) themselves, not in a tuple (indexing it would take the
    first video's frames)."""
    return decode_latents(pipe, output, request, generator)


def decode_latents(
    pipe: StableVideoDiffusionPipeline, latents: torch.Tensor, request: EngineRequest, generator: torch.Generator
) -> torch.Tensor:
    """Latents (B, F, C, H, W) from `output_type="latent"` -> video tensor (B, C, F, H, W) in
    [-1, 1], float32: the pipeline's own `decode_latents`, ``decode_chunk_size`` frames at a
    time in the VAE's dtype (after its loop the pipeline only puts a float16 VAE back into
    float16, where its image encode left it already)."""
    _, _, chunk = motion_values(request)
    if chunk < 1:
        raise ValueError(f"decode_chunk_size must be at least 1, got {chunk}")
    return pipe.decode_latents(latents, request.num_frames, chunk)


def joint_text_tokens(transformer_config: Mapping[str, Any]) -> int:
    """0: no text; the image embedding comes in through cross-attention."""
    return 0


def vae_decode_tile(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    """The temporal VAE has no tiled decode: the whole frame."""
    return _FULL_FRAME


def activation_width(unet_config: Mapping[str, Any]) -> int:
    """The width the memory estimate's denoising term should use for a UNet of this config
    (``hidden_size`` is a transformer's): twice its first stage's channels (see
    ``FACTS.memory.published``)."""
    channels = unet_config.get("block_out_channels") or PUBLISHED_CONFIGS["unet"]["block_out_channels"]
    return 2 * int(channels[0])


def build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]:
    """A random-weight Stable Video Diffusion with the real compression and depth: a temporal
    VAE with 8x compression (four stages, none in time) and a UNet that halves its latents
    three times, as SVD's does; the published scheduler. Channels are tiny (32, the least
    their hard-wired 32-group norms allow); the UNet cross-attends only in its first stage and
    its middle.

    The pipeline takes no text: farm's tiny T5 (`text_encoder`, `tokenizer`) is not used. Its
    image encoder is a tiny CLIP vision tower built from a config (the real 224-pixel input
    and 14-pixel patches), with CLIP's image processor, which needs no files.
    """
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    width = 32
    time_embed = 32  # per added time id (fps, motion bucket, noise augmentation)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
        image_size=PUBLISHED_CONFIGS["image_encoder"]["image_size"],
        patch_size=PUBLISHED_CONFIGS["image_encoder"]["patch_size"], projection_dim=width, hidden_act="gelu",
        layer_norm_eps=1e-5,
    )).eval()
    # CLIP's normalization and 224-pixel size, as the published feature_extractor's config.
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=1, sample_size=128,
        scaling_factor=PUBLISHED_CONFIGS["vae"]["scaling_factor"], force_upcast=True,
    )
    unet = UNetSpatioTemporalConditionModel(
        sample_size=16, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(width,) * 4,
        num_attention_heads=(2,) * 4, cross_attention_dim=width, addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=3 * time_embed, transformer_layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) + ("DownBlockSpatioTemporal",) * 3,
        up_block_types=("UpBlockSpatioTemporal",) * 3 + ("CrossAttnUpBlockSpatioTemporal",),
        num_frames=SVD_XT_FRAMES,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet,
        scheduler=EulerDiscreteScheduler(**PUBLISHED_CONFIGS["scheduler"]), feature_extractor=feature_extractor,
    )
    assert pipe.vae_scale_factor == FACTS.compression.spatial
    return {Task.IMAGE_TO_VIDEO: pipe}
