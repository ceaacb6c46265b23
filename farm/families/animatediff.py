"""AnimateDiff: everything farm knows of the family (see `farm.families` for what a family module offers).

Tasks: text-to-video (`AnimateDiffPipeline`): a Stable Diffusion 1.5 UNet with a motion
adapter's temporal attention layers inserted after its spatial layers (`UNetMotionModel`),
SD 1.5's 2D VAE decoding every frame on its own and its CLIP ViT-L text encoder. There is
no transformer: the denoiser is the pipeline's ``unet`` (``FACTS.denoiser``).

Sources: a model's source is one directory (or hub id) that holds the whole pipeline as
``AnimateDiffPipeline.save_pretrained`` writes it, its UNet already a `UNetMotionModel`.
AnimateDiff is published as two parts, an SD 1.5 checkpoint and a motion adapter (e.g.
``stable-diffusion-v1-5/stable-diffusion-v1-5`` + ``guoyww/animatediff-motion-adapter-v1-5-3``);
`save_pipeline` joins them once, where the weights can be downloaded::

    .venv/bin/python -c "from farm.families.animatediff import save_pipeline; \\
        save_pipeline('stable-diffusion-v1-5/stable-diffusion-v1-5', \\
                      'guoyww/animatediff-motion-adapter-v1-5-3', '/models/animatediff-v1-5-3')"

and the model's config names that directory (``sources: {text-to-video: /models/animatediff-v1-5-3}``).
It loads both parts, builds the motion UNet from them (`UNetMotionModel.from_unet2d`), sets
the model card's DDIM scheduler and saves the pipeline without its separate
``motion_adapter`` component: the motion UNet holds those weights already, and a pipeline
loaded with it keeps a second copy of all 417M motion parameters on the device. Any SD 1.5
fine-tune (e.g. Realistic Vision) takes the place of the base the same way.

The engine (`farm.engines.pipeline_engine`) splits a render into three timed phases:
it encodes the prompt with `encode_prompt` (the pipeline's own CLIP encoding), runs the
pipeline to latents, and decodes them with `decode_latents`, which is what
`AnimateDiffPipeline.__call__` does after its denoising loop: the VAE decodes
``decode_chunk_size`` frames at a time (16 unless a request says otherwise).

Preemption: the pipeline resumes from a checkpoint bitwise with DDIMScheduler (the model
cards' scheduler and the tiny model's). Its step reads only the timestep and the step
count that ``set_timesteps`` stored (the previous timestep is ``t - 1000 // steps``), and
with the pipeline's ``eta=0`` it draws no noise; ``init_noise_sigma`` is 1, so given latents
are taken as they are, and the pipeline's set-up draws nothing else (FreeInit and FreeNoise,
which would, are off unless enabled on the pipeline; farm never enables them).
EulerDiscreteScheduler (AnimateDiff-Lightning) reads its sigmas at its step index and, with
``s_churn`` 0, draws nothing. LCMScheduler (AnimateLCM) is not resumable: its step reads
``timesteps[step_index + 1]``, which a resumed call's shortened timesteps no longer hold.
A preemption in the middle of a step is checked before each of the UNet's layers (the
engine hooks a UNet's resnets, attentions, motion modules and resamplers).

Backends: the denoiser is a UNet taking (batch, channels, frames, height, width) latents and
the text embeddings repeated per frame (batch x frames, 77, 768). ``backend.vae_tiling`` makes
the 2D VAE decode 512 x 512 pixel tiles (its ``sample_size``) of each chunk of frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
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
    tiny_words,
)

if TYPE_CHECKING:
    import torch
    from diffusers import AnimateDiffPipeline
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image

    from farm.domain.engine import EngineRequest

FAMILY = Family.ANIMATEDIFF

# The pipeline's default `decode_chunk_size`: frames the VAE decodes in one batch.
DECODE_CHUNK_SIZE = 16
# The SD 1.5 VAE's `sample_size`: its tiled decode works on tiles this many pixels a side.
_VAE_SAMPLE_SIZE = 512
# The motion modules' sinusoidal position table (`motion_max_seq_length` of every published
# SD 1.5 motion adapter, v1 to v3): a frame beyond it has no position, and the UNet fails.
MOTION_MAX_SEQ_LENGTH = 32

# The model cards' scheduler (guoyww/animatediff-motion-adapter-v1-5-*): DDIM over SD 1.5's
# training betas with linear spacing, no clipping.
MODEL_CARD_DDIM = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
    timestep_spacing="linspace", steps_offset=1, set_alpha_to_one=False,
)

FACTS = FamilyFacts(
    limits=ModelLimits(
        # VAE 8x; the pipeline refuses sizes that are not multiples of 8. The UNet halves
        # the latents three times, but forwards the skip connections' sizes to its upsamplers
        # when they are odd, so any multiple of 8 renders (64 is not needed).
        size_multiple=8,
        # SD 1.5 was trained at 512 x 512; at twice that a side it repeats its subjects
        # across the frame.
        max_width=1024,
        max_height=1024,
        # Every frame has its own latent (a 2D VAE): any count.
        frame_step=1,
        # One frame is a still image; the motion modules attend across two or more.
        min_frames=2,
        max_frames=MOTION_MAX_SEQ_LENGTH,
        # DDIM's linspace spacing puts a lone step at timestep 0, whose update returns its
        # input: one step gives back the starting noise, whatever the UNet says. (Few-step
        # distilled models, e.g. AnimateDiff-Lightning with a trailing Euler scheduler, lower
        # this in their model config.)
        min_steps=2,
    ),
    # The model card (guoyww/animatediff-motion-adapter-v1-5-3): 512 x 512, 16 frames (the
    # motion modules' training length) at 8 fps (2 s), 25 DDIM steps, guidance 7.5.
    defaults=RenderDefaults(width=512, height=512, num_frames=16, fps=8, num_inference_steps=25,
                            guidance_scale=7.5),
    min_steps_reason=("AnimateDiff's DDIM scheduler puts a single step at timestep 0, where it "
                      "returns the starting noise; it takes two"),
    # A 2D VAE with 8x spatial compression, no temporal compression; the UNet works on
    # latent positions directly (no patches).
    compression=LatentCompression(spatial=8, temporal=1, patch=1),
    memory=MemoryFacts(
        # Counted on the meta device (tests/unit/test_family_animatediff.py): the decode of a
        # 16-frame chunk keeps 5.9 copies of the decoder's last stage (128 channels at full
        # resolution) alive at its peak, tiled (512-pixel tiles) or not.
        vae_widths=6,
        decode_frames=DECODE_CHUNK_SIZE,
        tiled_decode_frames=DECODE_CHUNK_SIZE,
        # Parameters counted from the published configs (`PUBLISHED_CONFIGS`) built on torch's
        # meta device with diffusers 0.42 and transformers 5: the SD 1.5 UNet (859,520,964)
        # with the v1-5-3 motion modules (417,137,600; no mid-block module), the SD 1.5 VAE
        # and CLIP ViT-L/14's text encoder.
        published=PipelineSizes(
            parameters={"unet": 1_276_658_564, "text_encoder": 123_060_480, "vae": 83_653_863},
            # A UNet has no single width. Counted on the meta device from 256 to 1024 pixels
            # a side, a guided pass keeps alive at its peak the bytes of 490 channels per latent
            # position at the estimate's 34 bytes a channel (13 in bfloat16 + 2 in float32);
            # 545 at 64 x 64, where fixed costs weigh more. `activation_width`, twice the first
            # stage's channels (640), is 1.2x to 1.3x that.
            hidden_size=640, joint_text_tokens=0, vae_channels=128, vae_patch_size=1,
            vae_tile=(_VAE_SAMPLE_SIZE, _VAE_SAMPLE_SIZE),
            described_by="the published Stable Diffusion 1.5 with AnimateDiff motion adapter v1-5-3 (assumed)"),
    ),
    tiny=TinyModel(
        name="animatediff-tiny",
        directories={Task.TEXT_TO_VIDEO: "animatediff-tiny"},
        defaults=RenderDefaults(width=64, height=64, num_frames=16, fps=8, num_inference_steps=8,
                                guidance_scale=7.5),
    ),
    checkpoint_schedulers={
        "DDIMScheduler": StepCarry.STATELESS,
        "EulerDiscreteScheduler": StepCarry.STEP_INDEXED,
    },
    denoiser="unet",
)

# The published models' configs (their config.json files, less the defaults), for counting
# their sizes on the meta device.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json.
    "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, norm_eps=1e-5,
    ),
    # guoyww/animatediff-motion-adapter-v1-5-3, config.json.
    "motion_adapter": dict(
        block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
        motion_max_seq_length=MOTION_MAX_SEQ_LENGTH, motion_num_attention_heads=8, motion_norm_num_groups=32,
        use_motion_mid_block=False,
    ),
    # stable-diffusion-v1-5/stable-diffusion-v1-5, vae/config.json.
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=_VAE_SAMPLE_SIZE, norm_num_groups=32,
        scaling_factor=0.18215,
    ),
    # openai/clip-vit-large-patch14, the text half of config.json.
    "text_encoder": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ),
}


def pipeline_classes() -> dict[Task, type[DiffusionPipeline]]:
    from diffusers import AnimateDiffPipeline

    return {Task.TEXT_TO_VIDEO: AnimateDiffPipeline}


def resumable_pipelines() -> tuple[type[DiffusionPipeline], ...]:
    """Given `latents`, it draws no noise and multiplies them by init_noise_sigma (1 for DDIM;
    the engine makes the resumed call see 1 for Euler); FreeInit and FreeNoise, the set-ups
    that draw or re-run more, are off unless enabled; its loop runs over the scheduler's
    timesteps."""
    from diffusers import AnimateDiffPipeline

    return (AnimateDiffPipeline,)


def call_kwargs(request: EngineRequest, image: Image.Image | None) -> dict:
    """Pipeline arguments for everything but the prompt (AnimateDiff takes no frame rate)."""
    return dict(
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
    )


def encode_prompt(pipe: AnimateDiffPipeline, request: EngineRequest, device: torch.device) -> dict:
    """CLIP embeddings (77 tokens), as keyword arguments for the pipeline call; the pipeline
    joins the two halves for guidance and repeats them for every frame."""
    embeds, negative_embeds = pipe.encode_prompt(
        prompt=request.prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=request.guidance_scale > 1.0,
        negative_prompt=request.negative_prompt or None,
    )
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)


def decode_latents(
    pipe: AnimateDiffPipeline, latents: torch.Tensor, request: EngineRequest, generator: torch.Generator
) -> torch.Tensor:
    """Latents (B, C, F, H, W) from `output_type="latent"` -> video tensor (B, C, F, H, W) in
    [-1, 1], float32: the pipeline's own `decode_latents`, ``decode_chunk_size`` frames at a time."""
    chunk = request.decode_chunk_size or DECODE_CHUNK_SIZE
    if chunk < 1:
        raise ValueError(f"decode_chunk_size must be at least 1, got {chunk}")
    return pipe.decode_latents(latents, chunk)


def joint_text_tokens(transformer_config: Mapping[str, Any]) -> int:
    """0: text comes in through cross-attention."""
    return 0


def vae_decode_tile(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    """AutoencoderKL tiles at its sample size."""
    size = int(vae_config.get("sample_size", _VAE_SAMPLE_SIZE))
    return (size, size)


def activation_width(unet_config: Mapping[str, Any]) -> int:
    """The width the memory estimate's denoising term should use for a UNet of this config
    (``hidden_size`` is a transformer's): twice its first stage's channels (see
    ``FACTS.memory.published``)."""
    channels = unet_config.get("block_out_channels") or PUBLISHED_CONFIGS["unet"]["block_out_channels"]
    return 2 * int(channels[0])



def save_pipeline(base: str, motion_adapter: str, directory: str | Path, *, revision: str | None = None,
                  adapter_revision: str | None = None) -> Path:
    """Writes the AnimateDiff pipeline of an SD 1.5 checkpoint and a motion adapter (hub ids or
    directories) to `directory`, the source a farm model config names (see the module docstring).

    The UNet is saved with the motion modules in it, the scheduler is the model cards' DDIM
    (`MODEL_CARD_DDIM`), and the separate motion adapter is left out."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    adapter = MotionAdapter.from_pretrained(motion_adapter, revision=adapter_revision)
    pipe = AnimateDiffPipeline.from_pretrained(base, motion_adapter=adapter, revision=revision)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **MODEL_CARD_DDIM)
    pipe.register_modules(motion_adapter=None)
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


# The tiny model's SD 1.5-shaped UNet (four stages, as SD 1.5's, with 8 channels and one
# layer each) and its motion adapter (no mid-block module, as v1-5-3; the real position table).
_TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 8, 8, 8),
    attention_head_dim=2, norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
_TINY_MOTION_ADAPTER = dict(
    block_out_channels=(8, 8, 8, 8), motion_layers_per_block=1, motion_num_attention_heads=2,
    motion_norm_num_groups=4, motion_max_seq_length=MOTION_MAX_SEQ_LENGTH, use_motion_mid_block=False,
)


def build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]:
    """A random-weight AnimateDiff with the real compression and depth: a 2D VAE with 8x
    compression (four stages) and a UNet that halves its latents three times, as SD 1.5's
    does; motion modules with the real 32-frame position table. Channels are tiny.

    AnimateDiff takes a CLIP text encoder: a tiny one is built from a config, with a CLIP
    tokenizer whose BPE vocabulary is learned here from the words of farm's tiny T5 tokenizer
    (`tokenizer`; the T5 `text_encoder` is not used). It is saved without the separate motion
    adapter, as `save_pipeline` saves a real one.
    """
    import torch
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    clip_tokenizer = _tiny_clip_tokenizer(tokenizer)
    torch.manual_seed(0)
    width = 32
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=clip_tokenizer.model_max_length, hidden_act="quick_gelu",
        projection_dim=width, bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=2, sample_size=_VAE_SAMPLE_SIZE, scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(**_TINY_UNET, cross_attention_dim=width)
    adapter = MotionAdapter(**_TINY_MOTION_ADAPTER)
    pipe = AnimateDiffPipeline(
        vae=vae, text_encoder=clip, tokenizer=clip_tokenizer, unet=unet, motion_adapter=adapter,
        scheduler=DDIMScheduler(**MODEL_CARD_DDIM),
    )
    pipe.register_modules(motion_adapter=None)
    return {Task.TEXT_TO_VIDEO: pipe}


def _tiny_clip_tokenizer(t5_tokenizer):
    """A CLIP tokenizer (byte-level BPE, 77 tokens) whose merges make each word of the T5
    tokenizer's vocabulary one token; anything else falls back to its bytes."""
    import json

    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    words = tiny_words(t5_tokenizer)
    special = ["<|startoftext|>", "<|endoftext|>"]
    empty = CLIPTokenizer(vocab={token: index for index, token in enumerate(special)}, merges=[])
    backend = empty.backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 16, min_frequency=0, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
    )
    backend.train_from_iterator(words, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)
