"""Wan 2.1 / 2.2: everything farm knows of the family (see `farm.families` for what a family module offers).

Tasks: text-to-video (`WanPipeline`) and image-to-video (`WanImageToVideoPipeline`) are
different checkpoints (Wan2.1-T2V-14B / -1.3B, Wan2.1-I2V-14B-480P / -720P, Wan2.2-T2V-A14B,
Wan2.2-I2V-A14B): the image-to-video transformer takes 36 input channels, the 16 of the
noisy latents beside a 4-channel first-frame mask and the 16 of the encoded image, so a Wan
model names a source per task and the engine loads two pipelines. Wan 2.1 image-to-video
adds a CLIP image encoder (`image_encoder`, `image_processor`) whose embeddings the
transformer attends to beside the text (``image_dim``, ``added_kv_proj_dim``); Wan 2.2 has
none (``image_dim`` None) and the pipeline skips it. Wan2.2-TI2V-5B serves both tasks from
one checkpoint (``expand_timesteps``: the image is the first latent frame) with a VAE of 16x
spatial compression: such a model's config sets ``limits.size_multiple`` to 32. Wan 2.2's
A14B checkpoints carry a second, low-noise transformer (``transformer_2``, switched to at
``boundary_ratio``); the pipelines run it, but backends prepare, and preemption checks
hook, the pipeline's ``transformer`` only.

Video-to-video (`WanVideoToVideoPipeline`, `video_to_video_pipeline_class()`) is not a farm
task yet. It runs on the text-to-video checkpoint's components unchanged
(``WanVideoToVideoPipeline(tokenizer=, text_encoder=, transformer=, vae=, scheduler=)``
from the text-to-video pipeline's ``components``, or ``WanVideoToVideoPipeline.from_pipe``):
it encodes the input video with the VAE (the latent distribution's mode, no random draw),
noises it to the first of its timesteps with the scheduler's ``add_noise`` (one draw from
the generator) and denoises only the last ``int(num_inference_steps * strength)`` of the
scheduler's timesteps, which it slices after ``set_timesteps``: its progress counts fewer
steps than the request names, and a checkpoint's resume (which cuts the timesteps inside
``set_timesteps``) must count from the first step it runs. Given ``latents`` it skips the
encode and the draw, as a resume needs; its decode is `decode_latents`.

The engine (`farm.engines.pipeline_engine`) splits a render into three timed phases:
it encodes the prompt with `encode_prompt` (the pipeline's own, at the 512 tokens its call
uses), runs the pipeline to latents, and decodes them with `decode_latents`, which is
what `WanPipeline.__call__` does after its loop: undo the latents' per-channel
normalisation (``latents_mean``, ``latents_std``) and decode. The pipelines clean prompts
with ftfy, a requirement: diffusers' image-to-video pipeline calls it unconditionally.

Preemption: the published scheduler, UniPCMultistepScheduler (flow prediction, flow
sigmas shifted by ``flow_shift``), is multistep: it keeps its last model outputs, the
last sample and its step index in itself, which the checkpoint keeps whole
(`StepCarry.MULTISTEP`) and puts back at the first resumed step. It draws no noise. Both
pipelines, given ``latents``, draw no noise and take them as they are; image-to-video
re-encodes its image on resume, deterministically: the VAE's latent distribution's mode
(``sample_mode="argmax"``), never a sample, and the CLIP image encoder's hidden states. So
both resume bitwise. FlowMatchEulerDiscreteScheduler (the pipelines' declared scheduler,
which a converted or distilled checkpoint may ship) is step-indexed; `WanPipeline` sets
its scheduler's begin index to 0 after ``set_timesteps``, so it resumes at the right sigma
only where the checkpoint sets the begin index again at the first resumed step.

Backends: the transformer takes the latents as one 5-D tensor (the patch embedding and
its 3D rotary tables derive the frame count and size from its shape) and the timestep
and text embeddings as tensors, so a graph is built per shape. Guidance runs as two
transformer calls of batch one (``cache_context`` "cond", then "uncond"), not one batch of
two. The transformer's blocks are ``transformer.blocks``, not ``transformer_blocks``: code
that finds a transformer's blocks (FP8 layers, mid-step preemption checks) must look there
too. The VAE decodes one latent frame at a time (4 video frames, the first alone) with a
causal cache; ``backend.vae_tiling`` adds spatial tiles of 256 x 256 pixels.
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
    from diffusers import WanPipeline
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image

    from farm.domain.engine import EngineRequest

FAMILY = Family.WAN

# The VAE turns 4k + 1 frames into k + 1 latent frames (the first alone, then 4 at a
# time); the pipelines round any other count down to that form, so they would return
# fewer frames than asked for.
FRAME_STEP = 4
# Text tokens the pipelines' own calls encode (padded with zeros past the prompt); the
# transformer attends to them through cross-attention.
TEXT_TOKENS = 512
# diffusers' tiled decode of the Wan VAE: 256 x 256 pixel tiles (stride 192).
_DECODE_TILE = (256, 256)

# Published configs (the diffusers conversion of Wan2.1-T2V-14B, scripts/convert_wan_to_diffusers.py,
# and its text encoder, google/umt5-xxl's encoder): what the memory facts below were counted from.
PUBLISHED_TRANSFORMER = dict(
    added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-06, ffn_dim=13824, freq_dim=256,
    in_channels=16, num_attention_heads=40, num_layers=40, out_channels=16, patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads", text_dim=4096,
)
PUBLISHED_TEXT_ENCODER = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
# AutoencoderKLWan's defaults are the published Wan 2.1 VAE (base_dim 96, z_dim 16, dim_mult (1, 2, 4, 4)).
PUBLISHED_VAE: dict[str, Any] = {}

# The published Diffusers scheduler config (UniPC with flow sigmas; flow_shift 3.0 in the
# Diffusers repositories, 5.0 recommended for 720P).
SCHEDULER_CONFIG = dict(
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    num_train_timesteps=1000,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
)

# Every published component's diffusers config kwargs, by pipeline component (the constants
# above; benchmarks/engine_step.py builds them with random weights at full size).
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "transformer": PUBLISHED_TRANSFORMER,
    "vae": PUBLISHED_VAE,
    "scheduler": SCHEDULER_CONFIG,
    "text_encoder": PUBLISHED_TEXT_ENCODER,
}

FACTS = FamilyFacts(
    # VAE 8x spatial and 4x temporal, transformer patch (1, 2, 2): sizes are multiples of
    # 16 and frame counts 4k + 1 (FRAME_STEP). 5 frames (two latent frames) is the shortest
    # clip with motion; 81 (5 s at 16 fps) is what the models were trained on and the model
    # cards' longest. The 14B models render 480P and 720P both ways (832x480, 1280x720 and
    # their portraits; the 1.3B model 480P): 1280 either way. UniPC and flow-matching Euler
    # both denoise in one step.
    limits=ModelLimits(
        size_multiple=16, frame_step=FRAME_STEP, min_frames=5, max_frames=81, max_width=1280, max_height=1280
    ),
    # The model cards' and the reference implementation's: 832x480 (480P), 81 frames at
    # 16 fps, 50 steps (text-to-video; its image-to-video takes 40), guidance 5.0.
    defaults=RenderDefaults(
        width=832, height=480, num_frames=81, fps=16, num_inference_steps=50, guidance_scale=5.0
    ),
    min_steps_reason=None,
    compression=LatentCompression(spatial=8, temporal=4, patch=2),
    # Counted on the meta device (tests/unit/test_family_wan.py): the VAE decoder's last
    # stage (96 channels at full resolution, one latent frame's 4 output frames at a time)
    # keeps up to 13 copies of itself alive with its causal frame caches; tiled, it keeps
    # every decoded tile (overlapping, so about 1.8 videos) until it blends them, 15 stage
    # copies past the estimate's video copies at 1280x720x81 - areas past 720P, which the
    # models were not trained on, need more. A transformer block keeps 11.1 hidden-state
    # widths alive (bfloat16; its float32 normalisations count twice; the rotary tables
    # are per head), within the estimate's widths. The estimate counts guidance as one
    # batch of two; Wan runs the two halves as two calls, half that.
    memory=MemoryFacts(
        vae_widths=16,
        # One latent frame at a time: 4 video frames (the first latent frame gives 1).
        decode_frames=FRAME_STEP,
        tiled_decode_frames=FRAME_STEP,
        # Parameters counted from the published configs above built on torch's meta device
        # with diffusers 0.42 and transformers 5. The 1.3B transformer has 1_418_996_800;
        # Wan2.1-I2V-14B's has 16_394_878_784 and adds a CLIP ViT-H/14 image encoder of
        # 630_766_080, which a model of that checkpoint reads from its files.
        published=PipelineSizes(
            parameters={"transformer": 14_288_491_584, "text_encoder": 5_680_910_336, "vae": 126_892_531},
            hidden_size=5120, joint_text_tokens=0, vae_channels=96, vae_patch_size=1, vae_tile=_DECODE_TILE,
            described_by="the published Wan2.1-T2V-14B with UMT5-XXL (assumed)"),
    ),
    tiny=TinyModel(
        name="wan-tiny",
        directories={Task.TEXT_TO_VIDEO: "wan-tiny", Task.IMAGE_TO_VIDEO: "wan-i2v-tiny"},
        defaults=RenderDefaults(width=128, height=96, num_frames=9, fps=16, num_inference_steps=4, guidance_scale=5.0),
    ),
    checkpoint_schedulers={
        "UniPCMultistepScheduler": StepCarry.MULTISTEP,
        "FlowMatchEulerDiscreteScheduler": StepCarry.STEP_INDEXED,
    },
    # The pipelines call the transformer for the conditional and unconditional halves one after the other.
    guidance_batch=1,
)


def pipeline_classes() -> dict[Task, type[DiffusionPipeline]]:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    return {Task.TEXT_TO_VIDEO: WanPipeline, Task.IMAGE_TO_VIDEO: WanImageToVideoPipeline}


def video_to_video_pipeline_class() -> type[DiffusionPipeline]:
    """The pipeline of the coming video-to-video task, on the text-to-video checkpoint's
    components (see the module's docstring)."""
    from diffusers import WanVideoToVideoPipeline

    return WanVideoToVideoPipeline


def resumable_pipelines() -> tuple[type[DiffusionPipeline], ...]:
    """Given `latents` both skip the noise draw and take them as they are; image-to-video
    re-encodes its image deterministically (the VAE's mode, the CLIP encoder's hidden
    states) and draws nothing else; their loop runs over the scheduler's timesteps and
    steps it once a step. The UniPC scheduler's history is the checkpoint's (MULTISTEP)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    return (WanPipeline, WanImageToVideoPipeline)


def call_kwargs(request: EngineRequest, image: Image.Image | None) -> dict:
    """Pipeline arguments for everything but the prompt (Wan takes no frame rate: it renders 16 fps)."""
    if (request.num_frames - 1) % FRAME_STEP != 0:
        rounded = (request.num_frames - 1) // FRAME_STEP * FRAME_STEP + 1
        raise ValueError(
            f"Wan renders {FRAME_STEP}k+1 frames (5, 9, ..., 81): its VAE decodes the first frame alone and then "
            f"{FRAME_STEP} at a time; the pipeline would render {rounded} frames for {request.num_frames}"
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


def encode_prompt(pipe: WanPipeline, request: EngineRequest, device: torch.device) -> dict:
    """Prompt embeddings, as keyword arguments for the pipeline call (the pipeline casts
    them to its transformer's dtype itself)."""
    embeds, negative_embeds = pipe.encode_prompt(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        do_classifier_free_guidance=request.guidance_scale > 1.0,
        max_sequence_length=TEXT_TOKENS,
        device=device,
    )
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)


def decode_latents(
    pipe: WanPipeline, latents: torch.Tensor, request: EngineRequest, generator: torch.Generator
) -> torch.Tensor:
    """Latents (B, C, F, H, W) from `output_type="latent"` -> video tensor (B, C, F, H, W) in [-1, 1]."""
    import torch
    from diffusers.utils.torch_utils import get_module_execution_device

    vae = pipe.vae
    latents = latents.to(get_module_execution_device(vae), dtype=vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    latents = latents / latents_std + latents_mean
    return vae.decode(latents, return_dict=False)[0]


def joint_text_tokens(transformer_config: Mapping[str, Any]) -> int:
    """0: text (and Wan 2.1 image-to-video's image embeddings) come in through cross-attention."""
    return 0


def vae_decode_tile(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    """diffusers' Wan VAE tiles at 256 x 256 pixels whatever its config."""
    return _DECODE_TILE


def build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]:
    """Random-weight Wan pipelines with the real compression: VAE 8x spatial, 4x temporal, patch (1, 2, 2).

    Text-to-video stands for Wan2.1-T2V-1.3B / 14B, image-to-video for Wan2.1-I2V-14B-480P /
    720P: a CLIP vision encoder whose penultimate hidden states the transformer attends to
    through added key/value projections, and 36 input channels. The text encoder is a tiny
    UMT5 (the published class) over farm's T5 vocabulary; farm's T5 encoder is not used.
    The scheduler is the published UniPC with flow sigmas, so multistep preemption is
    exercised. The VAE keeps the real layout (three spatial 2x stages, the last two also
    temporal, causal convolutions with a frame cache, a mid block with attention) at 2-4
    channels and one resnet a stage.
    """
    import torch
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    torch.manual_seed(0)
    umt5 = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
        use_cache=False, tie_word_embeddings=False,
    )).eval()
    latent_channels = 16  # the published z_dim, with its published latents_mean and latents_std
    # Four channels at every stage (halved where the decoder upsamples, as the real one)
    # and no extra resnets: on CPU, 3D convolutions this narrow run on PyTorch's slow
    # reference kernel, so every full-resolution layer costs the same whatever its width;
    # fewer layers is what helps.
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=latent_channels,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )
    compression = FACTS.compression
    assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (compression.spatial,
                                                                                  compression.temporal)
    scheduler = UniPCMultistepScheduler(**SCHEDULER_CONFIG)

    def transformer(in_channels: int, image_dim: int | None = None) -> WanTransformer3DModel:
        heads, head_dim = 2, 16
        return WanTransformer3DModel(
            patch_size=(1, compression.patch, compression.patch),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=in_channels,
            out_channels=latent_channels,
            text_dim=umt5.config.d_model,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            image_dim=image_dim,
            # As the published image-to-video transformer: the image's keys and values at the model's width.
            added_kv_proj_dim=None if image_dim is None else heads * head_dim,
        )

    text_to_video = WanPipeline(
        tokenizer=tokenizer, text_encoder=umt5, vae=vae, scheduler=scheduler, transformer=transformer(latent_channels)
    )
    # A 32-pixel CLIP (4 patches and the class token) with the published processor's
    # normalisation; the pipeline takes its penultimate hidden states.
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, image_size=32,
        patch_size=16, projection_dim=16,
    )).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # Noisy latents, the first-frame mask (one channel per frame of a latent frame) and the image latents.
    image_to_video = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=umt5,
        vae=vae,
        scheduler=scheduler,
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer(2 * latent_channels + compression.temporal,
                                image_dim=image_encoder.config.hidden_size),
    )
    return {Task.TEXT_TO_VIDEO: text_to_video, Task.IMAGE_TO_VIDEO: image_to_video}
