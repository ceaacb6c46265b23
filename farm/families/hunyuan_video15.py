"""HunyuanVideo 1.5: everything farm knows of the family (see `farm.families` for what a family module offers).

Tasks: text-to-video (`HunyuanVideo15Pipeline`) and image-to-video
(`HunyuanVideo15ImageToVideoPipeline`) are different checkpoints (480p_t2v / 480p_i2v,
720p_t2v / 720p_i2v) of one architecture: both transformers take 65 input channels, the
32 of the noisy latents beside 32 of condition latents and a 1-channel mask (zeros for
text-to-video, the encoded image and a first-frame mask for image-to-video), and attend to
729 SigLIP image tokens (zeros for text-to-video). Image-to-video adds the SigLIP image
encoder (`image_encoder`, `feature_extractor`), so a model names a source per task and
the engine loads two pipelines. Neither pipeline takes a frame rate: the models were
trained on 24 fps video, which only the output container records.

The diffusers pipelines lack three things the engine's call needs; the classes
`pipeline_classes()` gives are thin subclasses of them (same names, same
``__init__`` and saved format, loaded with ``from_pretrained`` from any HunyuanVideo 1.5
directory) whose call adds them, and runs the diffusers ``__call__`` unchanged inside:

- ``callback_on_step_end`` / ``callback_on_step_end_tensor_inputs`` (only ``"latents"``):
  the diffusers loop has no step callback. The subclass wraps its scheduler's ``step`` for
  the call and runs the callback on the step's output, as the diffusers loops that have
  one do right after ``scheduler.step``; the loop skips the remaining steps once
  ``_interrupt`` is set, so cancellation and preemption work as for every family.
- ``guidance_scale``: the scale lives in the pipeline's ``guider``
  (`diffusers.ClassifierFreeGuidance`, 6.0 in the published configs); the subclass sets it
  for the call and puts it back. A scale of 1 or less turns guidance off, as in farm's
  other families (the guider alone would still guide below 1).
- ``height`` / ``width`` for image-to-video: the diffusers pipeline picks the size itself,
  from the image's aspect ratio among the buckets of its training resolution
  (``transformer.config.target_size``); the subclass makes that pick the requested size,
  and the pipeline then crops and resizes the image to it, as it does to its own pick.

Classifier-free guidance runs as two transformer calls of batch 1 (the guider's
conditional and unconditional batches, each in its own ``cache_context``), not one batch
of two as in the other families.

The engine (`farm.engines.pipeline_engine`) splits a render into three timed phases:
it encodes the prompt with `encode_prompt` (the pipeline's own: the Qwen2.5-VL
embeddings of the prompt in its chat template, and the ByT5 glyph embeddings of any text
in quotes, zeros when there is none), runs the pipeline to latents, and decodes them with
`decode_latents`, which is what `HunyuanVideo15Pipeline.__call__` does after its loop.

Preemption: both pipelines resume from a checkpoint bitwise. Their scheduler,
FlowMatchEulerDiscreteScheduler (``shift`` 5 at 480p, 7 or 9 at 720p), keeps no state
between steps but its step index, which the engine sets on resume; the pipelines pass it
sigmas from the step count alone (``linspace(1, 0, N + 1)[:-1]``) and never reset its
begin index. Given ``latents`` they draw nothing from the generator (the decode draws
nothing either); image-to-video re-encodes its image deterministically (the VAE's latent
distribution's mode, ``sample_mode="argmax"``, and SigLIP's hidden states). The guider
has state of its own, the step it is at and the step count, from which a guider with
``start`` / ``stop`` fractions decides whether a step is guided: the diffusers loop
counts both from the resumed call's first step, so the subclass adds the scheduler's
begin index (the steps before the resume) to both, and a resumed call guides the same
steps as an uninterrupted one. The image-to-video loop of a MeanFlow checkpoint
(``use_meanflow``) reads the next timestep from its own list, which a resume shortens
consistently.

Backends: the transformer takes the latents as one 5-D tensor (its rotary tables derive
the frame count and size from the shape) and 1985 text tokens beside them (the 1000 of
Qwen2.5-VL, the 256 of ByT5 and the 729 image tokens, padding masked), attended to
jointly with the video's. The VAE decodes the whole video at once; ``backend.vae_tiling``
adds spatial tiles of 256 x 256 pixels (the whole video in time).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
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
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image

    from farm.domain.engine import EngineRequest

FAMILY = Family.HUNYUAN_VIDEO_1_5

# Text tokens the transformer attends to jointly with the video's: the pipelines pad the
# Qwen2.5-VL prompt to 1000 tokens (``tokenizer_max_length``, after cropping the 108 of
# the chat template's system part), the ByT5 glyph text to 256 (``tokenizer_2_max_length``)
# and always pass 729 SigLIP image tokens (``vision_num_semantic_tokens``: 27 x 27 patches
# of a 384-pixel image; zeros, masked, for text-to-video). Pipeline constants, not config.
_TEXT_TOKENS = 1000 + 256 + 729
# The tiled decode (diffusers' AutoencoderKLHunyuanVideo15 defaults): 256 x 256 pixels.
_DECODE_TILE = (256, 256)

# The published HunyuanVideo 1.5 480p (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v
# and _i2v): the diffusers config kwargs of each component (the conversion script's 480p
# transformer - the two tasks' differ only in `task_type`, which the model does not read - and its
# default VAE; the encoders' configs), what the memory facts below were counted from and what
# benchmarks/engine_step.py builds with random weights.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "transformer": dict(
        in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
        num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm", text_embed_dim=3584,
        text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0, rope_axes_dim=(16, 56, 56), target_size=640,
        task_type="t2v", use_meanflow=False,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(128, 256, 512, 1024, 1024),
        layers_per_block=2, spatial_compression_ratio=16, temporal_compression_ratio=4,
        downsample_match_channel=True, upsample_match_channel=True, scaling_factor=1.03682,
    ),
    # FlowMatchEulerDiscreteScheduler at 480p (7 or 9 at 720p).
    "scheduler": dict(shift=5.0),
    # ClassifierFreeGuidance.
    "guider": dict(guidance_scale=6.0),
    # Qwen2.5-VL-7B-Instruct's language model (Qwen2_5_VLTextConfig).
    "text_encoder": dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    # ByT5-small's encoder (T5Config), without the few Glyph-SDXL-v2 tokens it adds.
    "text_encoder_2": dict(
        vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, tie_word_embeddings=False,
    ),
    # SigLIP so400m-patch14-384's vision model (SiglipVisionConfig), image-to-video only.
    "image_encoder": dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14,
    ),
}

FACTS = FamilyFacts(
    # VAE 16x spatial and 4x temporal (a causal first frame), transformer patch 1 in space
    # and time: sizes are multiples of 16 and frame counts 4k + 1. The model card's videos
    # are 121 frames (5 s at 24 fps; the technical report speaks of 5-10 s, which a model's
    # config may allow); its resolutions are 480p (848 x 480 at 16:9) and 720p (1280 x 720),
    # in either orientation. The shortest clip with motion is the causal first frame and one
    # latent frame of 4: 5 frames. One Euler step from sigma 1 to 0 works.
    limits=ModelLimits(size_multiple=16, frame_step=4, min_frames=5, max_frames=121, max_width=1280,
                       max_height=1280),
    # The model card's inference settings for 480p: 121 frames, 50 steps, CFG 6, 16:9, which
    # the pipeline's bucket for 480p (target_size 640) makes 848 x 480; 24 fps, the rate the
    # diffusers example writes them at.
    defaults=RenderDefaults(
        width=848, height=480, num_frames=121, fps=24, num_inference_steps=50, guidance_scale=6.0
    ),
    min_steps_reason=None,
    compression=LatentCompression(spatial=16, temporal=4, patch=1),
    # Counted (tests/unit/test_family_hunyuan_video15.py): about 7 copies of the VAE
    # decoder's last stage alive at its peak (6.95 untiled, 6.45-6.75 tiled). The mid block's
    # causal attention mask, latent positions squared, is not in proportion: under one copy
    # up to 720p at 121 frames, more beyond (1280 x 1280), where no untiled decode fits a GPU. A transformer block keeps about 25 bytes per token and
    # hidden unit alive in bfloat16 (the 1985 text tokens counted), within the estimate's
    # widths; but the estimate counts a guided render as one batch of two, where this
    # family's guider runs two passes of one, so it holds twice what a guided pass needs.
    memory=MemoryFacts(
        vae_widths=7,
        decode_frames=None,  # untiled, the whole video at once
        tiled_decode_frames=None,  # spatial tiles only: each tile is the whole video in time
        # Parameters counted from the published configs (the diffusers conversion script's
        # 480p transformer, its default VAE, Qwen2.5-VL-7B's text model, ByT5-small's
        # encoder without the few Glyph-SDXL-v2 tokens it adds, SigLIP so400m-patch14-384's
        # vision model) built on torch's meta device with diffusers 0.42 and transformers 5.
        published=PipelineSizes(
            parameters={"transformer": 8_326_608_160, "text_encoder": 7_070_619_136, "text_encoder_2": 217_657_472,
                        "vae": 1_260_634_115, "image_encoder": 428_225_600},
            hidden_size=2048, joint_text_tokens=_TEXT_TOKENS, vae_channels=128, vae_patch_size=1,
            vae_tile=_DECODE_TILE,
            # Image-to-video's: text-to-video's lacks the image encoder, 0.4B of 17.3B.
            described_by="the published HunyuanVideo-1.5 480p image-to-video with Qwen2.5-VL-7B, ByT5 and "
                         "SigLIP (assumed)"),
    ),
    tiny=TinyModel(
        name="hunyuanvideo-1.5-tiny",
        directories={Task.TEXT_TO_VIDEO: "hunyuanvideo-1.5-tiny", Task.IMAGE_TO_VIDEO: "hunyuanvideo-1.5-i2v-tiny"},
        # Few steps: every transformer call attends to the 1985 text tokens whatever the size.
        defaults=RenderDefaults(width=128, height=96, num_frames=9, fps=24, num_inference_steps=4,
                                guidance_scale=6.0),
    ),
    checkpoint_schedulers={"FlowMatchEulerDiscreteScheduler": StepCarry.STEP_INDEXED},
    # Its guider runs the conditional and unconditional passes one after the other.
    guidance_batch=1,
    lora=False,  # diffusers 0.42's HunyuanVideo 1.5 pipelines have no LoRA loader
)

_PIPELINE_NAMES = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")


def pipeline_classes() -> dict[Task, type[DiffusionPipeline]]:
    text_to_video, image_to_video = _farm_pipelines()
    return {Task.TEXT_TO_VIDEO: text_to_video, Task.IMAGE_TO_VIDEO: image_to_video}


def resumable_pipelines() -> tuple[type[DiffusionPipeline], ...]:
    """Given `latents` both draw no noise and take them as they are (the scheduler's
    init_noise_sigma is 1); image-to-video re-encodes its image deterministically (the
    latent distribution's mode and SigLIP's hidden states); their loop runs over the
    scheduler's timesteps and never resets its begin index; the guider's step count is
    continued from the scheduler's begin index (`_FarmCall`). The diffusers classes
    themselves are not resumable: they take no step callback at all."""
    return _farm_pipelines()


def call_kwargs(request: EngineRequest, image: Image.Image | None) -> dict:
    """Pipeline arguments for everything but the prompt (HunyuanVideo 1.5 takes no frame rate)."""
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


def encode_prompt(pipe: DiffusionPipeline, request: EngineRequest, device: torch.device) -> dict:
    """Both encoders' embeddings and masks for the prompt (and, guided, the negative
    prompt), in the transformer's dtype, as the pipeline's call encodes them."""
    dtype = pipe.transformer.dtype
    embeds, mask, glyph_embeds, glyph_mask = pipe.encode_prompt(prompt=request.prompt, device=device, dtype=dtype)
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, prompt_embeds_2=glyph_embeds,
                  prompt_embeds_mask_2=glyph_mask)
    if request.guidance_scale > 1.0:
        # None, as the pipeline's call encodes a missing negative prompt: the empty one.
        embeds, mask, glyph_embeds, glyph_mask = pipe.encode_prompt(
            prompt=request.negative_prompt or None, device=device, dtype=dtype)
        kwargs.update(negative_prompt_embeds=embeds, negative_prompt_embeds_mask=mask,
                      negative_prompt_embeds_2=glyph_embeds, negative_prompt_embeds_mask_2=glyph_mask)
    return kwargs


def decode_latents(
    pipe: DiffusionPipeline, latents: torch.Tensor, request: EngineRequest, generator: torch.Generator
) -> torch.Tensor:
    """Latents (B, C, F, H, W) from `output_type="latent"` -> video tensor (B, C, F, H, W) in [-1, 1]."""
    latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
    return pipe.vae.decode(latents, return_dict=False)[0]


def joint_text_tokens(transformer_config: Mapping[str, Any]) -> int:
    """1985 whatever the config: the pipelines' padded lengths (see `_TEXT_TOKENS`)."""
    return _TEXT_TOKENS


def vae_decode_tile(vae_config: Mapping[str, Any]) -> tuple[int, int]:
    """diffusers' HunyuanVideo 1.5 VAE tiles at 256 x 256 pixels (not in its config)."""
    return _DECODE_TILE


# The pipelines the engine runs -------------------------------------------------------------


class _FarmCall:
    """What the engine's call needs beyond the diffusers ``__call__``: a step callback and a
    guidance scale per call (see the module's docstring). Everything else goes through."""

    _callback_tensor_inputs = ["latents"]

    def __call__(self, *args, guidance_scale: float | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, **kwargs):
        inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        unknown = [name for name in inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not among {self._callback_tensor_inputs}")
        with self._guidance(guidance_scale), self._step_callback(callback_on_step_end, inputs):
            return super().__call__(*args, **kwargs)

    @contextlib.contextmanager
    def _guidance(self, guidance_scale: float | None) -> Iterator[None]:
        guider = self.guider
        saved = (guider.guidance_scale, guider._enabled)
        original_set_state = guider.set_state
        if guidance_scale is not None:
            guider.guidance_scale = guidance_scale
            if guidance_scale <= 1.0:
                guider._enabled = False

        @functools.wraps(original_set_state)
        def set_state(step, num_inference_steps, timestep):
            # A resumed call's loop counts from its first step; the steps before it are the
            # scheduler's begin index (None outside a resume).
            before = self.scheduler.begin_index or 0
            original_set_state(step=step + before, num_inference_steps=num_inference_steps + before,
                               timestep=timestep)

        # Whether the call encodes a negative prompt is asked of the guider before its first
        # step: not of the state the previous call left.
        original_set_state(step=0, num_inference_steps=None, timestep=None)
        guider.set_state = set_state
        try:
            yield
        finally:
            del guider.set_state
            guider.guidance_scale, guider._enabled = saved

    @contextlib.contextmanager
    def _step_callback(self, callback, inputs: list[str]) -> Iterator[None]:
        if callback is None:
            yield
            return
        scheduler = self.scheduler
        own = "step" in vars(scheduler)  # already wrapped for this call (a checkpoint's wrapper)
        inner = scheduler.step
        calls = 0

        @functools.wraps(inner)
        def step(*args, **kwargs):
            nonlocal calls
            output = inner(*args, **kwargs)
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            latents = output[0]
            outputs = callback(self, calls, timestep, {name: latents for name in inputs})
            calls += 1
            changed = (outputs or {}).get("latents", latents)
            if changed is latents:
                return output
            if isinstance(output, tuple):
                return (changed, *output[1:])
            output.prev_sample = changed
            return output

        scheduler.step = step
        try:
            yield
        finally:
            if own:
                scheduler.step = inner
            else:
                del scheduler.step


class _FarmImageCall(_FarmCall):
    """Image-to-video also takes the size (see the module's docstring)."""

    def __call__(self, *args, height: int | None = None, width: int | None = None, **kwargs):
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or neither (the pipeline then picks a size bucket)")
        with self._size(height, width):
            return super().__call__(*args, **kwargs)

    @contextlib.contextmanager
    def _size(self, height: int | None, width: int | None) -> Iterator[None]:
        if height is None:
            yield
            return
        processor = self.video_processor
        multiple = self.vae_scale_factor_spatial
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, not {height} x {width}")
        processor.calculate_default_height_width = lambda **_: (height, width)
        try:
            yield
        finally:
            del processor.calculate_default_height_width


@functools.cache
def _farm_pipelines() -> tuple[type[DiffusionPipeline], type[DiffusionPipeline]]:
    """The engine's pipeline classes, made once (importing diffusers only when asked for)."""
    import diffusers

    made = []
    for name, mixin in zip(_PIPELINE_NAMES, (_FarmCall, _FarmImageCall)):
        base = getattr(diffusers, name)
        made.append(type(name, (mixin, base), {"__module__": __name__, "__qualname__": name,
                                               "__doc__": f"`diffusers.{name}` with farm's call (see {__name__})."}))
    return made[0], made[1]


def __getattr__(name: str):
    # The classes by name (pickling, repr), made on first use.
    if name in _PIPELINE_NAMES:
        return _farm_pipelines()[_PIPELINE_NAMES.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The tiny model --------------------------------------------------------------------------


def build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]:
    """Random-weight HunyuanVideo 1.5 pipelines with the real compression: VAE 16x spatial,
    4x temporal, patch 1, and the real text lengths (1000 Qwen2.5-VL tokens, 256 ByT5
    bytes, 729 SigLIP tokens of a 384-pixel image).

    Their encoders are tiny instances of the real classes built from configs: a
    Qwen2.5-VL text model with a byte-level BPE tokenizer made here (whole words for the
    words of farm's tiny T5 vocabulary, `tokenizer`, and of the pipeline's system
    message) and Qwen's chat template; ByT5 (`T5EncoderModel` with ByT5's 384 byte ids,
    `ByT5Tokenizer`, which needs no files); SigLIP's vision model at its real 384 x 384
    input and 14-pixel patches. farm's tiny T5 `text_encoder` is not used.

    Two directories, as the real checkpoints: the tasks' transformers are separate
    weights of one architecture, and image-to-video adds the image encoder.
    """
    import torch
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(0)
    qwen_tokenizer = _tiny_qwen_tokenizer(tokenizer)
    head_dim = 16
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(qwen_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        # The pipeline takes the hidden states 2 layers before the last.
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=2048,
        # Multimodal rotary sections (time, height, width) summing to half a head, as Qwen2.5-VL's.
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=qwen_tokenizer.pad_token_id,
        use_cache=False,
    )).eval()
    byt5_tokenizer = ByT5Tokenizer()
    byt5 = T5EncoderModel(T5Config(
        vocab_size=len(byt5_tokenizer),  # 384: 3 special ids, 256 bytes, 125 extra ids
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # as ByT5's
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )).eval()
    siglip_size, siglip_patch = 384, 14
    siglip = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=siglip_size, patch_size=siglip_patch,
    )).eval()
    feature_extractor = SiglipImageProcessorPil(size={"height": siglip_size, "width": siglip_size})

    latent_channels = 4
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=latent_channels,
        # Five stages as the real (128, 256, 512, 1024, 1024): four 2x spatial steps, the
        # last two also 2x in time. A stage that halves time packs 8 positions into the
        # channels of the next, so those have 8 channels at least.
        block_out_channels=(4, 8, 8, 8, 8),
        layers_per_block=0,  # one resnet a decoder stage (layers_per_block + 1), none in the encoder
    )
    compression = FACTS.compression
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (compression.spatial,
                                                                              compression.temporal)

    def transformer(task_type: str) -> HunyuanVideo15Transformer3DModel:
        return HunyuanVideo15Transformer3DModel(
            # The noisy latents, the condition latents and the mask.
            in_channels=2 * latent_channels + 1,
            out_channels=latent_channels,
            num_attention_heads=2,
            attention_head_dim=head_dim,
            num_layers=1,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=compression.patch,
            patch_size_t=1,
            text_embed_dim=qwen.config.hidden_size,
            text_embed_2_dim=byt5.config.d_model,
            image_embed_dim=siglip.config.hidden_size,
            rope_axes_dim=(4, 6, 6),  # time, height, width: one head's 16
            target_size=640,  # 480p's buckets
            task_type=task_type,
        )

    # The published 480p configs: shift 5, guidance 6.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    guider = ClassifierFreeGuidance(guidance_scale=6.0)
    shared = dict(text_encoder=qwen, tokenizer=qwen_tokenizer, text_encoder_2=byt5, tokenizer_2=byt5_tokenizer,
                  vae=vae, scheduler=scheduler, guider=guider)
    text_to_video = HunyuanVideo15Pipeline(transformer=transformer("t2v"), **shared)
    image_to_video = HunyuanVideo15ImageToVideoPipeline(
        transformer=transformer("i2v"), image_encoder=siglip, feature_extractor=feature_extractor, **shared)
    return {Task.TEXT_TO_VIDEO: text_to_video, Task.IMAGE_TO_VIDEO: image_to_video}


# Qwen's chat template for messages whose content is a string.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_qwen_tokenizer(t5_tokenizer):
    """A Qwen2 tokenizer (byte-level BPE) with whole-word tokens for the words of farm's
    tiny T5 vocabulary and of the pipeline's system message, each after a space (as BPE
    learns them); anything else falls back to bytes, so every text encodes. Its chat
    template's system part is 166 tokens where the real tokenizer's is the 108 the pipeline
    crops, so the user's prompt is never cropped and the embeddings keep the system
    message's last tokens before it."""
    import inspect

    from diffusers import HunyuanVideo15Pipeline
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    system_message = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters[
        "system_message"].default
    words = set(tiny_words(t5_tokenizer))
    words |= {word for word in system_message.replace(".", " ").replace(",", " ").replace(":", " ").split()
              if word.isalpha()}
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab: dict[str, int] = {}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in sorted(words):
        [(pieces, _)] = byte_level.pre_tokenize_str(" " + word)
        # Merged left to right, every merge keeps the word's first piece (the space), so
        # merges of different words never compete inside one word.
        for end in range(2, len(pieces) + 1):
            merged = pieces[:end]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((pieces[:end - 1], pieces[end - 1]))
    qwen = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768, padding_side="right")
    qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    qwen.chat_template = _CHAT_TEMPLATE
    return qwen
