"""CogVideoX: everything farm knows of the family (see `farm.families` for what a family module offers).

Tasks: text-to-video (`CogVideoXPipeline`) and image-to-video
(`CogVideoXImageToVideoPipeline`) are different checkpoints (the image-to-video
transformer takes the image latents as extra input channels), so a CogVideoX model
names a different source per task and the engine loads two pipelines.

The engine (`farm.engines.pipeline_engine`) splits a render into three timed phases:
it encodes the prompt with `encode_prompt`, runs the pipeline to latents, and
decodes them with `decode_latents`, which is what `CogVideoXPipeline.__call__`
does after its denoising loop.

Preemption: both pipelines can resume from a checkpoint bitwise with CogVideoXDPMScheduler
(CogVideoX-5B, the tiny models) and CogVideoXDDIMScheduler (CogVideoX-2B). The DPM scheduler's
second-order update needs the previous step's x0 prediction, which the pipeline keeps in a loop
variable; the engine keeps it from the scheduler's `step` output and hands it back at the
first resumed step, with the previous timestep and the generator's state (DPM draws noise
every step).

Backends: the transformer attends to the text tokens and the video's jointly, and
takes its 3D rotary embeddings as tensors. The VAE always decodes a few latent
frames at a time; ``backend.vae_tiling`` adds spatial tiles.
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
    from diffusers import CogVideoXPipeline
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image

    from farm.domain.engine import EngineRequest

FAMILY = Family.COGVIDEOX

# The CogVideoX VAE decodes two latent frames (8 video frames) at a time and handles
# the first frame alone only in a batch of three, so it returns exactly num_frames
# only when the latent frame count, (num_frames - 1) / 4 + 1, is odd: num_frames = 8k + 1.
# Otherwise it returns 3 frames more (the first one repeated), e.g. 16 for 13
# (zai-org/CogVideo#786).
FRAME_STEP = 8
# Text tokens the published transformers attend to jointly with the video's.
_TEXT_TOKENS = 226

# The published CogVideoX-5B (THUDM/CogVideoX-5b): the diffusers config kwargs of each
# component, with random weights what benchmarks/engine_step.py builds at full size and what
# the memory facts below were counted from.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    # transformer/config.json.
    "transformer": dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
        freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=42, dropout=0.0, attention_bias=True,
        sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=_TEXT_TOKENS, activation_fn="gelu-approximate", timestep_activation_fn="silu",
        norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    ),
    # vae/config.json: 8x spatial, 4x temporal compression, 16 latent channels.
    "vae": dict(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 512), latent_channels=16,
        layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32, temporal_compression_ratio=4,
        sample_height=480, sample_width=720, scaling_factor=0.7, force_upcast=True, use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    # scheduler/scheduler_config.json (CogVideoXDPMScheduler).
    "scheduler": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                      snr_shift_scale=1.0, timestep_spacing="trailing"),
    # google/t5-v1_1-xxl's encoder (T5EncoderModel's T5Config).
    "text_encoder": dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, pad_token_id=0,
        eos_token_id=1,
    ),
}

FACTS = FamilyFacts(
    # VAE 8x spatial and 4x temporal, transformer patch 2: sizes are multiples of 16;
    # frame counts 8k + 1 (FRAME_STEP). The DDIM and DPM schedulers take one step.
    limits=ModelLimits(
        size_multiple=16, frame_step=FRAME_STEP, min_frames=9, max_frames=49, max_width=1360, max_height=768
    ),
    defaults=RenderDefaults(
        width=720, height=480, num_frames=49, fps=8, num_inference_steps=50, guidance_scale=6.0
    ),
    min_steps_reason=None,
    compression=LatentCompression(spatial=8, temporal=4, patch=2),
    # Counted on the meta device (tests/unit/test_memory.py): about 20 copies of the VAE
    # decoder's last stage alive at its peak; in a transformer block 11.2 hidden-state
    # widths in the model's dtype and 0.9 in float32 (rotary tables per position, not per
    # width), within the estimate's widths for every family.
    memory=MemoryFacts(
        vae_widths=20,
        # 2 latent frames at a time, 3 the first time: 9 frames at most, tiled or not.
        decode_frames=9,
        tiled_decode_frames=9,
        # Parameters counted from the published config (`PUBLISHED_CONFIGS`) built on
        # torch's meta device with diffusers 0.42 and transformers.
        published=PipelineSizes(
            parameters={"transformer": 5_570_283_072, "text_encoder": 4_762_310_656, "vae": 215_583_907},
            hidden_size=3072, joint_text_tokens=_TEXT_TOKENS, vae_channels=128, vae_patch_size=1,
            vae_tile=(240, 360), described_by="the published CogVideoX-5B with T5-XXL (assumed)"),
    ),
    tiny=TinyModel(
        name="cogvideox-tiny",
        directories={Task.TEXT_TO_VIDEO: "cogvideox-tiny", Task.IMAGE_TO_VIDEO: "cogvideox-i2v-tiny"},
        defaults=RenderDefaults(width=256, height=160, num_frames=17, fps=8, num_inference_steps=8, guidance_scale=6.0),
    ),
    checkpoint_schedulers={
        "CogVideoXDPMScheduler": StepCarry.DPM_CARRY,
        "CogVideoXDDIMScheduler": StepCarry.STATELESS,
    },
)


def pipeline_classes() -> dict[Task, type[DiffusionPipeline]]:
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    return {Task.TEXT_TO_VIDEO: CogVideoXPipeline, Task.IMAGE_TO_VIDEO: CogVideoXImageToVideoPipeline}


def resumable_pipelines() -> tuple[type[DiffusionPipeline], ...]:
    """Given `latents` both draw no noise and multiply them by init_noise_sigma (1 for the
    DPM and DDIM schedulers); image-to-video re-encodes its image with the generator fresh
    from the seed, which was its first draw in the interrupted attempt too; their loop runs
    over the scheduler's timesteps. The DPM scheduler's carried x0 prediction lives in the
    loop, not in the scheduler: the engine captures it from and gives it back to
    `scheduler.step`."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    return (CogVideoXPipeline, CogVideoXImageToVideoPipeline)


def call_kwargs(request: EngineRequest, image: Image.Image | None) -> dict:
    """Pipeline arguments for everything but the prompt (CogVideoX takes no frame rate)."""
    if (request.num_frames - 1) % FRAME_STEP != 0:
        raise ValueError(
            f"CogVideoX renders {FRAME_STEP}k+1 frames (9, 17, 25, 33, 41, 49); "
            f"{request.num_frames} frames would decode to {request.num_frames + 3}"
        )
    kwargs = dict(
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
    )
    if request.task == Task.IMAGE_TO_VIDEO:
        kwargs["image"] = image
    return kwargs


def encode_prompt(pipe: CogVideoXPipeline, request: EngineRequest, device: torch.device) -> dict:
    """Prompt embeddings, as keyword arguments for the pipeline call."""
    embeds, negative_embeds = pipe.encode_prompt(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        do_classifier_free_guidance=request.guidance_scale > 1.0,
        device=device,
    )
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)


def decode_latents(
    pipe: CogVideoXPipeline, latents: torch.Tensor, request: EngineRequest, generator: torch.Generator
) -> torch.Tensor:
    """Latents (B, F, C, H, W) from `output_type="latent"` -> video tensor (B, C, F, H, W) in [-1, 1]."""
    # CogVideoX 1.5 pads the latent frames up to a multiple of its temporal patch;
    # the pipeline drops that padding before decoding, and so do we.
    latent_frames = (request.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    patch_size_t = pipe.transformer.config.patch_size_t
    padding_frames = 0
    if patch_size_t is not None and latent_frames % patch_size_t != 0:
        padding_frames = patch_size_t - latent_frames % patch_size_t
    return pipe.decode_latents(latents[:, padding_frames:])


def joint_text_tokens(transformer_config: Mapping[str, Any]) -> int:
    return int(transformer_config.get("max_text_seq_length", _TEXT_TOKENS))


def vae_decode_tile(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    """diffusers' CogVideoX VAE tiles at half its sample size."""
    return (vae_config.get("sample_height", 480) // 2, vae_config.get("sample_width", 720) // 2)


def build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]:
    """Random-weight CogVideoX 1.0 pipelines with the real compression: VAE 8x spatial, 4x temporal, patch 2.

    Like CogVideoX-5B they use 3D rotary embeddings (no learned positional table),
    so every size that is a multiple of 16 works, at any frame count 4k+1.
    """
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    torch.manual_seed(0)
    latent_channels = 4
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        # Two channels and one resnet per block: on CPU, PyTorch runs 3D convolutions
        # this narrow on its slow reference kernel (one core), so every full-resolution
        # layer costs the same a frame batch whatever its width; fewer layers is what helps.
        block_out_channels=(2, 2, 2, 2),
        latent_channels=latent_channels,
        layers_per_block=0,
        norm_num_groups=1,
        temporal_compression_ratio=4,
        scaling_factor=0.7,
    )
    # The CogVideoX-5B scheduler config.
    scheduler = CogVideoXDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )

    def transformer(in_channels: int) -> CogVideoXTransformer3DModel:
        return CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=in_channels,
            out_channels=latent_channels,
            time_embed_dim=16,
            text_embed_dim=text_encoder.config.d_model,
            num_layers=1,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=_TEXT_TOKENS,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        )

    text_to_video = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer(latent_channels),
        scheduler=scheduler,
    )
    # The image-to-video transformer sees the noisy latents and the image latents side by side.
    image_to_video = CogVideoXImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer(2 * latent_channels),
        scheduler=scheduler,
    )
    return {Task.TEXT_TO_VIDEO: text_to_video, Task.IMAGE_TO_VIDEO: image_to_video}
