"""One denoising step, the VAE decode and the whole render of every model family at its
published full size, on every backend that runs here.

Each family's denoiser (transformer or UNet), VAE and the other model components it needs
(LTX-2's text connectors, audio VAE and vocoder; Stable Video Diffusion's CLIP image
encoder; AnimateDiff's motion modules) are built from the family module's
``PUBLISHED_CONFIGS`` (`farm.families`) with random weights, directly on the device in the
compute dtype: dense compute costs the same whatever the weights, and nothing can be
downloaded. The text encoders of LTX-Video, CogVideoX (T5-XXL) and AnimateDiff (CLIP ViT-L)
are built at their published size too and encode the prompt. Those of Wan (UMT5-XXL, 5.7B),
LTX-2 (Gemma 3 12B) and HunyuanVideo 1.5 (Qwen2.5-VL 7B and ByT5) are not: the family's
tiny encoder stands in for them (it gives the lengths and masks the engine passes) and the
prompt embeddings are random, of the published encoder's width. The output says which.

For each family, at its default shape (``FACTS.defaults``: width, height, frames; guidance
at the default scale), it reports

- ms per step: one guided denoising step on the exact arguments the family's pipeline
  passes to its denoiser (captured from the pipeline's own first call) - one call of
  batch 2 where the pipeline runs the conditional and unconditional halves together, two
  calls of batch 1 where it runs them one after the other (``FACTS.guidance_batch``);
- achieved TFLOP/s: the step's FLOPs divided by its time. LTX-Video and CogVideoX count
  their matrix products analytically (attention projections, attention scores and
  weighted sums, MLPs, embeddings and output projections; checked against torch's
  FlopCounterMode on the same call); every other family takes FlopCounterMode's count of
  the real call. On a CPU, FlopCounterMode does not see the attention kernels, so its
  counts there leave attention out;
- the fraction of the matrix-product rate measured on the same device in the same run
  (a large square matmul in the compute dtype);
- the speed-up over eager in the same run, and the relative error against eager
  (max|x - eager| / max|eager|);

plus the family's decode (`decode_latents`: the VAE decode the engine runs, tiled where
the untiled decode would not fit a GPU at that shape) of latents of that shape, with its
FlopCounterMode TFLOP/s, and the whole render through the family's pipeline as the engine
runs it (prompt, denoising to latents, the family's decode, uint8 frames, MP4) per backend,
with the family's step count unless that would take longer than --render-max-s.

Full size needs a GPU. On a CPU-only machine it refuses, unless given --allow-cpu with
fewer --layers (every component's depth - transformer blocks, UNet and VAE resnets per
stage, encoder layers - capped at that; widths stay published) and a small --shape, which
is a smoke test of this script and of the backends, not a measurement worth reporting
(--shape min: each family's smallest shape). At the published widths that takes minutes for
the seven families on two CPU cores (the published text lengths - LTX-2's 1024 tokens through
its 3840-wide connectors, HunyuanVideo's 1985 - cost the same at any shape); with --tiny the
family's tiny model (`farm.engines.tiny`'s, its real compression) stands in for the published
components, seconds for all seven, which tests/unit/test_engine_step.py runs:

    .venv/bin/python benchmarks/engine_step.py --allow-cpu --layers 1 --shape min --steps 2 \\
        --backends eager --repeats 1 [--tiny]

On a GPU (one H100: 80 GB holds every family in bfloat16, the largest being LTX-2's 19B
transformer and 1.4B connectors), one family per command to stay within a 10-minute call:

    python benchmarks/engine_step.py --family ltx-video --json ltx.json
    python benchmarks/engine_step.py --family cogvideox --json cogvideox.json
    python benchmarks/engine_step.py --family wan --backends eager --json wan.json
    python benchmarks/engine_step.py --family ltx-2 --backends eager --json ltx2.json
    python benchmarks/engine_step.py --family hunyuanvideo-1.5 --backends eager --json hunyuan.json
    python benchmarks/engine_step.py --family stable-video-diffusion --json svd.json
    python benchmarks/engine_step.py --family animatediff --json animatediff.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # farm from this source tree, also where farm is not installed (a GPU machine).
    sys.path.insert(0, str(ROOT))

import torch

from farm.config import BackendConfig
from farm.engines.backends import create_backend
from farm.engines.backends.backend import (
    BackendUnavailable,
    CallSignature,
    TransformerRouter,
    as_inference_tensors,
    capture_transformer_call,
    complete_arguments,
    first_output,
    relative_error,
)
from farm.engines.backends.shapes import parse_shape
from farm.families import DecodedClip, Family, family_facts, family_module
from farm.families import animatediff as _animatediff
from farm.families import cogvideox as _cogvideox
from farm.families import ltx_video as _ltx_video

# Published configs ------------------------------------------------------------------------
# Each family module's PUBLISHED_CONFIGS; these names stay for the code that reads them here
# (tests/unit/test_memory.py, benchmarks/parallel_step.py).
LTX_TRANSFORMER = _ltx_video.PUBLISHED_CONFIGS["transformer"]
LTX_VAE = _ltx_video.PUBLISHED_CONFIGS["vae"]
LTX_SCHEDULER = _ltx_video.PUBLISHED_CONFIGS["scheduler"]
COGVIDEOX_TRANSFORMER = _cogvideox.PUBLISHED_CONFIGS["transformer"]
COGVIDEOX_VAE = _cogvideox.PUBLISHED_CONFIGS["vae"]
COGVIDEOX_SCHEDULER = _cogvideox.PUBLISHED_CONFIGS["scheduler"]
# google/t5-v1_1-xxl, the text encoder of both.
T5_XXL = _ltx_video.PUBLISHED_CONFIGS["text_encoder"]

BACKENDS = ("eager", "compile", "onnx", "fp8")  # fp8 last: it quantizes the denoiser in place
PROMPT = "a red fox running through a snowy forest at dawn, cinematic, detailed fur, soft light"
NEGATIVE_PROMPT = "blurry, low quality"
# The whole render runs the family's step count unless that would take longer than this.
DEFAULT_RENDER_MAX_S = 120.0
# Config keys of a component's depth, capped by --layers (widths stay published).
DEPTH_KEYS = ("num_layers", "num_hidden_layers", "num_refiner_layers", "layers_per_block", "decoder_layers_per_block",
              "num_res_blocks", "motion_layers_per_block", "video_connector_num_layers", "audio_connector_num_layers")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    shape: str
    steps: int
    guidance_scale: float
    fps: int
    text_tokens: int
    vae_tiling: bool


@dataclasses.dataclass(frozen=True)
class FamilyBench:
    """How one family's published model is built and fed here."""

    name: str
    """The model measured (`MODELS`' key)."""
    classes: dict[str, str]
    """The pipeline components built from the family's PUBLISHED_CONFIGS: component ->
    "module:Class" (transformers models are built from their config class; "unet+motion_adapter"
    is AnimateDiff's motion UNet from the SD 1.5 UNet and motion adapter configs). Every other
    component is the family's tiny model's (tokenizers, processors, stand-in encoders)."""
    text_tokens: int
    """Text tokens of the published pipeline's prompt encoding (0: no text)."""
    vae_tiling: bool
    """Whether the decode is tiled (the engine's `backend.vae_tiling`) at the default shape."""
    latents: str
    """The layout `decode_latents` takes: "packed" (B, tokens, C), "BCFHW" or "BFCHW"."""
    embedding_widths: Callable[[dict[str, dict]], dict[str, int]] | None = None
    """For a family whose published text encoder is not built: the prompt keyword arguments
    that get random embeddings, and their published widths, from the configs built."""
    published_encoders: tuple[str, ...] = ()
    """The published text encoders that stand-ins replace (with random embeddings)."""


BENCHES: dict[Family, FamilyBench] = {
    Family.LTX_VIDEO: FamilyBench(
        "ltx-video-2b",
        {"transformer": "diffusers:LTXVideoTransformer3DModel", "vae": "diffusers:AutoencoderKLLTXVideo",
         "scheduler": "diffusers:FlowMatchEulerDiscreteScheduler", "text_encoder": "transformers:T5EncoderModel"},
        text_tokens=128, vae_tiling=False, latents="packed"),
    # diffusers' CogVideoX examples decode with tiling: untiled, 49 frames at 720x480 need far more memory.
    Family.COGVIDEOX: FamilyBench(
        "cogvideox-5b",
        {"transformer": "diffusers:CogVideoXTransformer3DModel", "vae": "diffusers:AutoencoderKLCogVideoX",
         "scheduler": "diffusers:CogVideoXDPMScheduler", "text_encoder": "transformers:T5EncoderModel"},
        text_tokens=226, vae_tiling=True, latents="BFCHW"),
    # The VAE decodes one latent frame at a time with its causal cache: untiled fits.
    Family.WAN: FamilyBench(
        "wan2.1-t2v-14b",
        {"transformer": "diffusers:WanTransformer3DModel", "vae": "diffusers:AutoencoderKLWan",
         "scheduler": "diffusers:UniPCMultistepScheduler"},
        text_tokens=512, vae_tiling=False, latents="BCFHW",
        embedding_widths=lambda c: dict.fromkeys(("prompt_embeds", "negative_prompt_embeds"),
                                                 c["transformer"]["text_dim"]),
        published_encoders=("UMT5-XXL",)),
    # Untiled, about 3 copies of the decoder's last stage (256 channels at a quarter of the
    # size) for the whole video: a few GiB at 768x512x121.
    Family.LTX_2: FamilyBench(
        "ltx-2-19b",
        {"transformer": "diffusers:LTX2VideoTransformer3DModel", "connectors": "diffusers.pipelines.ltx2:LTX2TextConnectors",
         "vae": "diffusers:AutoencoderKLLTX2Video", "audio_vae": "diffusers:AutoencoderKLLTX2Audio",
         "vocoder": "diffusers.pipelines.ltx2.vocoder:LTX2Vocoder",
         "scheduler": "diffusers:FlowMatchEulerDiscreteScheduler"},
        text_tokens=1024, vae_tiling=False, latents="BCFHW",
        # Gemma's hidden states of every layer and of its embeddings, side by side.
        embedding_widths=lambda c: dict.fromkeys(
            ("prompt_embeds", "negative_prompt_embeds"),
            c["connectors"]["caption_channels"] * c["connectors"]["text_proj_in_factor"]),
        published_encoders=("Gemma 3 12B",)),
    # Untiled, the decoder keeps about 7 copies of its last stage (128 channels) for all 121
    # frames at full size alive, some 80 GiB at 848x480: tiled (256-pixel tiles).
    Family.HUNYUAN_VIDEO_1_5: FamilyBench(
        "hunyuanvideo-1.5-480p-t2v",
        {"transformer": "diffusers:HunyuanVideo15Transformer3DModel", "vae": "diffusers:AutoencoderKLHunyuanVideo15",
         "scheduler": "diffusers:FlowMatchEulerDiscreteScheduler", "guider": "diffusers:ClassifierFreeGuidance"},
        text_tokens=1000 + 256 + 729, vae_tiling=True, latents="BCFHW",
        embedding_widths=lambda c: {
            **dict.fromkeys(("prompt_embeds", "negative_prompt_embeds"), c["transformer"]["text_embed_dim"]),
            **dict.fromkeys(("prompt_embeds_2", "negative_prompt_embeds_2"), c["transformer"]["text_embed_2_dim"])},
        published_encoders=("Qwen2.5-VL 7B", "ByT5-small")),
    # No tiled decode; 14 frames at a time (the family's decode_chunk_size) bound its memory.
    Family.STABLE_VIDEO_DIFFUSION: FamilyBench(
        "svd-xt",
        {"unet": "diffusers:UNetSpatioTemporalConditionModel", "vae": "diffusers:AutoencoderKLTemporalDecoder",
         "image_encoder": "transformers:CLIPVisionModelWithProjection",
         "scheduler": "diffusers:EulerDiscreteScheduler"},
        text_tokens=0, vae_tiling=False, latents="BFCHW"),
    # 16 frames of 512 x 512 at a time.
    Family.ANIMATEDIFF: FamilyBench(
        "animatediff-v1-5-3",
        {"unet": "unet+motion_adapter", "vae": "diffusers:AutoencoderKL", "text_encoder": "transformers:CLIPTextModel",
         "scheduler": "diffusers:DDIMScheduler"},
        text_tokens=77, vae_tiling=False, latents="BCFHW"),
}


def model_spec(family: Family) -> ModelSpec:
    """A family's published model at its defaults (`FamilyFacts.defaults`)."""
    bench, defaults = BENCHES[family], family_facts(family).defaults
    return ModelSpec(bench.name, family.value, f"{defaults.width}x{defaults.height}x{defaults.num_frames}",
                     defaults.num_inference_steps, defaults.guidance_scale, defaults.fps, bench.text_tokens,
                     bench.vae_tiling)


MODELS: dict[str, ModelSpec] = {BENCHES[family].name: model_spec(family) for family in BENCHES}


# FLOPs ------------------------------------------------------------------------------------


def ltx_transformer_flops(config: dict, latent_tokens: int, text_tokens: int, batch: int,
                          attention: bool = True) -> float:
    """Matrix-product FLOPs of one LTXVideoTransformer3DModel call (2 per multiply-add);
    attention=False leaves out the attention scores and weighted sums."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, t = latent_tokens, text_tokens
    cross = config["cross_attention_dim"]
    block = (
        2 * n * d * 3 * d  # self-attention q, k, v
        + attention * 4 * n * n * d  # self-attention scores and weighted sum
        + 2 * n * d * d  # self-attention output
        + 2 * n * d * d  # cross-attention q
        + 2 * t * cross * 2 * d  # cross-attention k, v from the text
        + attention * 4 * n * t * d  # cross-attention scores and weighted sum
        + 2 * n * d * d  # cross-attention output
        + 2 * 2 * n * d * 4 * d  # MLP up and down (4x)
    )
    embeddings = (
        2 * n * config["in_channels"] * d  # proj_in
        + 2 * t * (config["caption_channels"] * d + d * d)  # caption projection
        + 2 * (256 * d + d * d + d * 6 * d)  # timestep embedding and adaLN (one timestep per sample)
        + 2 * n * d * config["out_channels"]  # proj_out
    )
    return float(batch * (config["num_layers"] * block + embeddings))


def cogvideox_transformer_flops(config: dict, latent_tokens: int, text_tokens: int, batch: int,
                                attention: bool = True) -> float:
    """Matrix-product FLOPs of one CogVideoXTransformer3DModel call (joint text-video attention);
    attention=False leaves out the attention scores and weighted sums."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    p, e = config["patch_size"], config["time_embed_dim"]
    n, t = latent_tokens, text_tokens
    s = n + t
    block = (
        2 * 2 * e * 6 * d  # the two adaLN-zero modulations from the time embedding
        + 2 * s * d * 3 * d  # q, k, v over text and video tokens together
        + attention * 4 * s * s * d  # scores and weighted sum
        + 2 * s * d * d  # output
        + 2 * 2 * s * d * 4 * d  # MLP up and down (4x)
    )
    embeddings = (
        2 * n * config["in_channels"] * p * p * d  # patch embedding (a strided conv)
        + 2 * t * config["text_embed_dim"] * d  # text projection
        + 2 * (d * e + e * e)  # timestep embedding
        + 2 * e * 2 * d  # final adaLN
        + 2 * n * d * p * p * config["out_channels"]  # proj_out
    )
    return float(batch * (config["num_layers"] * block + embeddings))


# The families whose denoiser has an analytic FLOP count; the others are counted.
FLOP_FORMULAS: dict[Family, Callable[..., float]] = {
    Family.LTX_VIDEO: ltx_transformer_flops,
    Family.COGVIDEOX: cogvideox_transformer_flops,
}


def counted_flops(call: Callable[[], Any]) -> float:
    """FLOPs torch's FlopCounterMode sees in one call (matmuls, convolutions, attention)."""
    return counted(call)[0]


def counted(call: Callable[[], Any]) -> tuple[float, Any]:
    """FlopCounterMode's FLOPs of one call, and the call's result."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = call()
    return float(counter.get_total_flops()), result


# Building the models ----------------------------------------------------------------------


def family_of(spec: ModelSpec) -> Family:
    return Family(spec.family)


def render_task(family: Family):
    """The task measured: text-to-video where the family serves it, else its first task."""
    from farm.domain.spec import Task

    tasks = list(family_module(family).pipeline_classes())
    return Task.TEXT_TO_VIDEO if Task.TEXT_TO_VIDEO in tasks else tasks[0]


def published_configs(family: Family, layers: int | None) -> dict[str, dict[str, Any]]:
    """The family's PUBLISHED_CONFIGS of the components built here (AnimateDiff's motion
    adapter and DDIM scheduler included), each depth capped at `layers` (None: published)."""
    module = family_module(family)
    configs = {name: dict(config) for name, config in module.PUBLISHED_CONFIGS.items()}
    if family is Family.ANIMATEDIFF:
        configs["scheduler"] = dict(_animatediff.MODEL_CARD_DDIM)  # the model cards' scheduler
    if layers:
        configs = {name: capped(config, layers) for name, config in configs.items()}
    return configs


def capped(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """A config with every depth (`DEPTH_KEYS`, numbers or per-stage tuples) at most `layers`;
    LTX-2's connectors take the hidden states of as many text encoder layers, and its embeddings'."""
    config = dict(config)
    for key in DEPTH_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            config[key] = min(value, layers)
        elif isinstance(value, tuple | list):
            config[key] = type(value)(min(item, layers) for item in value)
    if "text_proj_in_factor" in config:
        config["text_proj_in_factor"] = min(config["text_proj_in_factor"], layers + 1)
    return config


def _class(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def constructing(device: torch.device, dtype: torch.dtype):
    """Modules made in this block are made on the device, in the dtype: a 19B transformer
    never exists in float32 (twice the memory) on the way."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def keep_in_float32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """What diffusers' from_pretrained does with a model's `_keep_in_fp32_modules` (e.g. Wan's
    time embedder and norms) at any torch_dtype: those parameters stay float32."""
    keep = getattr(model, "_keep_in_fp32_modules", None)
    if not keep or dtype == torch.float32:
        return
    keep = [keep] if isinstance(keep, str) else list(keep)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and any(part in name.split(".") for part in keep):
            tensor.data = tensor.data.float()


def build_component(path: str, config: dict[str, Any], configs: dict[str, dict], device: torch.device,
                    dtype: torch.dtype):
    """One component with random weights from its config, on the device in the dtype."""
    torch.manual_seed(0)
    if path == "unet+motion_adapter":
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

        with torch.device("meta"):  # only their configs are read
            unet = UNet2DConditionModel(**config)
            adapter = MotionAdapter(**configs["motion_adapter"])
        with constructing(device, dtype):
            model = UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
        return as_built(model, device, dtype)
    cls = _class(path)
    if not issubclass(cls, torch.nn.Module):  # schedulers and guiders: numbers, in float32
        return cls(**config)
    with constructing(device, dtype):
        config_class = getattr(cls, "config_class", None)
        model = cls(config_class(**config)) if path.startswith("transformers:") else cls(**config)
    model = as_built(model, device, dtype)
    keep_in_float32(model, dtype)
    return model


def as_built(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Every tensor on the device in the dtype, as the old benchmark's cast, through torch's own
    `to` (diffusers' warns of modules to keep in float32, which `keep_in_float32` handles)."""
    return torch.nn.Module.to(model, device, dtype).eval()


def build_pipeline(spec: ModelSpec, layers: int | None, device: torch.device, dtype: torch.dtype,
                   tiny: bool = False):
    """The family's diffusers pipeline (the class the engine runs) with random weights, built
    directly on the device: the published components of `FamilyBench.classes`, depth capped at
    `layers`, and the tiny model's for the rest (tokenizers, processors, stand-in encoders).
    tiny: the tiny model's components throughout (a smoke test's). Returns the pipeline and the
    denoiser's config."""
    from farm.engines.tiny import build_tiny_text_encoder

    family = family_of(spec)
    module, bench = family_module(family), BENCHES[family]
    task = render_task(family)
    text_encoder, tokenizer = build_tiny_text_encoder()
    # A real T5 tokenizer needs no weights; the tiny models' one is built offline.
    if bench.text_tokens:
        tokenizer.model_max_length = bench.text_tokens
    tiny_pipe = module.build_tiny_pipelines(text_encoder, tokenizer)[task]
    configs = published_configs(family, layers)
    components = dict(tiny_pipe.components)
    del tiny_pipe
    built = {} if tiny else bench.classes
    for name, path in built.items():
        components[name] = build_component(path, configs[name], configs, device, dtype)
    for name, component in components.items():
        if name not in built and isinstance(component, torch.nn.Module):
            components[name] = as_built(component, device, dtype)  # the tiny stand-ins
    pipe = module.pipeline_classes()[task](**components)
    pipe.set_progress_bar_config(disable=True)
    if spec.vae_tiling:
        from farm.engines.loading import enable_vae_tiling

        enable_vae_tiling(pipe.vae)
    return pipe, dict(getattr(pipe, family_facts(family).denoiser).config)


def denoiser_of(pipe, spec: ModelSpec) -> torch.nn.Module:
    return getattr(pipe, family_facts(family_of(spec)).denoiser)


def built_configs(pipe, spec: ModelSpec) -> dict[str, dict[str, Any]]:
    """The configs of the published components as built (their depth capped or not)."""
    configs = {}
    for name in BENCHES[family_of(spec)].classes:
        config = getattr(getattr(pipe, name, None), "config", None)
        if isinstance(config, Mapping):  # diffusers' (a transformers model's config is no mapping)
            configs[name] = dict(config)
    return configs


def engine_request(spec: ModelSpec, shape, steps: int):
    """The request the engine would get for this render (a first frame for image-to-video)."""
    from farm.cli.demo import first_frame_png
    from farm.domain.engine import EngineRequest
    from farm.domain.spec import Task

    family = family_of(spec)
    task, uses_prompt = render_task(family), family_facts(family).uses_prompt
    return EngineRequest(render_id="engine-step", attempt=0, task=task, prompt=PROMPT if uses_prompt else "",
                         negative_prompt=NEGATIVE_PROMPT if uses_prompt else "",
                         image=first_frame_png(shape.width, shape.height) if task == Task.IMAGE_TO_VIDEO else None,
                         width=shape.width, height=shape.height, num_frames=shape.num_frames, fps=spec.fps,
                         num_inference_steps=steps, guidance_scale=spec.guidance_scale, seed=0)


def conditioning_image(request):
    if request.image is None:
        return None
    from PIL import Image

    with Image.open(io.BytesIO(request.image)) as image:
        return image.convert("RGB")


def pipeline_kwargs(spec: ModelSpec, shape, steps: int) -> dict[str, Any]:
    """Pipeline arguments of a render with the prompt as text, which the pipeline encodes
    itself (families whose published text encoder is built here)."""
    family = family_of(spec)
    request = engine_request(spec, shape, steps)
    kwargs = family_module(family).call_kwargs(request, conditioning_image(request))
    if family_facts(family).uses_prompt:
        kwargs.update(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT)
    return kwargs


def prompt_kwargs(pipe, spec: ModelSpec, request, device: torch.device) -> dict[str, Any]:
    """The prompt's keyword arguments for the pipeline call, as the engine makes them (the
    family's encode_prompt); where a stand-in encoder replaces the published one, its
    embeddings are replaced by random ones of the published width (same lengths and masks)."""
    family = family_of(spec)
    kwargs = family_module(family).encode_prompt(pipe, request, device)
    widths = BENCHES[family].embedding_widths
    if widths is None:
        return kwargs
    generator = torch.Generator(device=device).manual_seed(0)
    for name, width in widths(built_configs(pipe, spec)).items():
        if kwargs.get(name) is not None:
            stand_in = kwargs[name]
            kwargs[name] = torch.randn((*stand_in.shape[:-1], width), generator=generator, device=device,
                                       dtype=stand_in.dtype)
    return kwargs


def describe_prompt(pipe, spec: ModelSpec, tiny: bool = False) -> str:
    family = family_of(spec)
    bench = BENCHES[family]
    built = "the tiny model's" if tiny else "the published config's (random weights)"
    if not family_facts(family).uses_prompt:
        return f"no text: the image is encoded by {built} image encoder"
    if bench.embedding_widths is None:
        return f"{built} {type(pipe.text_encoder).__name__} encodes the prompt"
    published = family_facts(family).memory.published.parameters
    sizes = sum(count for name, count in published.items() if name.startswith("text_encoder"))
    widths = sorted(set(bench.embedding_widths(built_configs(pipe, spec)).values()))
    return (f"random prompt embeddings of the width the {family_facts(family).denoiser} takes "
            f"({', '.join(map(str, widths))}): the published {' and '.join(bench.published_encoders)} "
            f"({sizes / 1e9:.1f}B parameters) not built; a tiny {type(pipe.text_encoder).__name__} stands in "
            "for the lengths and masks")


def decode_latents_shape(pipe, spec: ModelSpec, shape) -> tuple[int, ...]:
    """Latents of one video at this shape, as the pipeline hands them to the decode."""
    family = family_of(spec)
    compression = family_facts(family).compression
    config = pipe.vae.config
    channels = getattr(config, "latent_channels", None) or config.z_dim
    frames = compression.latent_frames(shape.num_frames)
    height, width = shape.height // compression.spatial, shape.width // compression.spatial
    layout = BENCHES[family].latents
    if layout == "BFCHW":
        return (1, frames, channels, height, width)
    return (1, channels, frames, height, width)


def random_latents(pipe, spec: ModelSpec, shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(decode_latents_shape(pipe, spec, shape), generator=generator, device=device, dtype=dtype)
    if BENCHES[family_of(spec)].latents == "packed":
        latents = pipe._pack_latents(latents, pipe.transformer_spatial_patch_size,
                                     pipe.transformer_temporal_patch_size)
    return latents


def decode(pipe, family: Family, output, request, generator) -> DecodedClip:
    """The engine's decode phase: the family's decode_output, or decode_latents."""
    module = family_module(family)
    decode_output = getattr(module, "decode_output", None)
    decoded = (decode_output(pipe, output, request, generator) if decode_output is not None
               else module.decode_latents(pipe, output[0], request, generator))
    return decoded if isinstance(decoded, DecodedClip) else DecodedClip(video=decoded)


def capture_denoiser_call(pipe, denoiser: torch.nn.Module, call_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of the pipeline's first call of its denoiser (a transformer or a UNet)."""

    class Calling:
        transformer = denoiser

        def __call__(self, **kwargs):
            return pipe(**kwargs)

    return capture_transformer_call(Calling(), call_kwargs)


# Timing -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device, repeats: int, warmups: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls after `warmups` untimed ones, and the last result."""
    result = None
    for _ in range(warmups):
        result = call()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds, result


def matmul_rate(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """TFLOP/s of a large square matrix product in the compute dtype, on this device, now."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = timed(lambda: a @ b, device, repeats=20 if device.type == "cuda" else 5, warmups=3)
    best = min(seconds)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * size**3 / best / 1e12}


# One model --------------------------------------------------------------------------------


def smallest_shape(family: Family):
    """The smallest shape the family's limits allow (a smoke test's)."""
    limits = family_facts(family).limits
    side = -(-max(limits.min_size, limits.size_multiple) // limits.size_multiple) * limits.size_multiple
    frames = limits.min_frames + (-(limits.min_frames - 1) % limits.frame_step)
    return parse_shape(f"{side}x{side}x{frames}")


def render_shape(spec: ModelSpec, shape: str | None):
    """--shape: WIDTHxHEIGHTxFRAMES, "min" (each family's smallest), or None (its default)."""
    if shape == "min":
        return smallest_shape(family_of(spec))
    return parse_shape(shape or spec.shape)


def shape_problem(family: Family, shape) -> str | None:
    """Why the family cannot render this shape (its limits), or None."""
    limits = family_facts(family).limits
    if shape.width % limits.size_multiple or shape.height % limits.size_multiple:
        return f"width and height must be multiples of {limits.size_multiple}"
    if min(shape.width, shape.height) < limits.min_size:
        return f"width and height must be at least {limits.min_size}"
    if shape.width > limits.max_width or shape.height > limits.max_height:
        return f"at most {limits.max_width} x {limits.max_height}"
    if (shape.num_frames - 1) % limits.frame_step or not limits.min_frames <= shape.num_frames <= limits.max_frames:
        return (f"frame counts are {limits.frame_step}k + 1 from {limits.min_frames} to {limits.max_frames}"
                if limits.frame_step > 1 else f"{limits.min_frames} to {limits.max_frames} frames")
    return None


def run_model(spec: ModelSpec, args, device: torch.device, dtype: torch.dtype, matmul: dict) -> dict[str, Any]:
    family = family_of(spec)
    facts = family_facts(family)
    shape = render_shape(spec, args.shape)
    steps = args.steps or spec.steps
    guided = spec.guidance_scale > 1.0
    # Guided, the pipeline calls its denoiser once with a batch of two, or twice with one.
    calls = 2 if guided and facts.guidance_batch == 1 else 1
    batch_note = f"batch {facts.guidance_batch if guided else 1}" + (", two calls" if calls == 2 else "")
    print(f"\n== {spec.name} ({family.value}) {shape.spec}, guidance {spec.guidance_scale} ({batch_note}), "
          f"{steps} steps", flush=True)
    results: dict[str, Any] = {"model": spec.name, "family": family.value, "shape": shape.spec, "steps": steps,
                               "backends": {}}
    problem = shape_problem(family, shape)
    if problem:
        results["not_run"] = f"{shape.spec}: {problem}"
        print(f"   not run: {results['not_run']}", flush=True)
        return results

    started = time.perf_counter()
    pipe, config = build_pipeline(spec, args.layers, device, dtype, tiny=args.tiny)
    denoiser = denoiser_of(pipe, spec)
    parameters = {name: sum(p.numel() for p in module.parameters())
                  for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    published = facts.memory.published.parameters
    built = {} if args.tiny else {name: count for name, count in parameters.items()
                                  if name in BENCHES[family].classes}
    layers = config.get("num_layers", config.get("layers_per_block"))
    results.update(
        denoiser=facts.denoiser, layers=layers, build_s=time.perf_counter() - started, parameters=parameters,
        built_from_published_configs=sorted(built),
        parameters_as_published=bool(built) and all(published.get(name) == count for name, count in built.items()
                                                    if name in published),
        prompt=describe_prompt(pipe, spec, args.tiny), vae_tiling=spec.vae_tiling,
    )
    if args.tiny:
        results["stand_in"] = "the family's tiny model (farm.engines.tiny's), not the published configs"
    source = ("the TINY model stands in for the published one" if args.tiny else "from the published configs: "
              + ", ".join(f"{name} {count / 1e9:.2f} B" for name, count in built.items()))
    print(f"   built with random weights in {results['build_s']:.1f} s: {facts.denoiser} depth {layers}, "
          f"{parameters[facts.denoiser] / 1e9:.2f} B {facts.denoiser} parameters; {source}", flush=True)
    print(f"   prompt: {results['prompt']}", flush=True)

    request = engine_request(spec, shape, 2)
    with torch.no_grad():  # not inference tensors: the backends export and compile with the captured call
        kwargs = {**family_module(family).call_kwargs(request, conditioning_image(request)),
                  **prompt_kwargs(pipe, spec, request, device)}
        arguments = capture_denoiser_call(pipe, denoiser, {**kwargs, "output_type": "latent"})
    serving_arguments = as_inference_tensors(arguments, device)
    hidden = next(value for value in serving_arguments.values() if isinstance(value, torch.Tensor))
    batch = int(hidden.shape[0])
    compression = facts.compression
    latent_tokens = (compression.latent_frames(shape.num_frames) * (shape.height // compression.token_pixels)
                     * (shape.width // compression.token_pixels))

    def one_call():
        return denoiser(**serving_arguments, return_dict=False)

    with torch.inference_mode():  # counted, and the eager output the backends are compared with
        started = time.perf_counter()
        counted_call, output = counted(one_call)
        eager_output = first_output(output).clone()
        del output
        synchronize(device)
        counted_s = time.perf_counter() - started
    counted_step = calls * counted_call
    formula = FLOP_FORMULAS.get(family)
    if formula is not None:
        text_tokens = arguments["encoder_hidden_states"].shape[1]
        flops = calls * formula(config, latent_tokens, text_tokens, batch)
        flops_without_attention = calls * formula(config, latent_tokens, text_tokens, batch, attention=False)
        # FlopCounterMode knows the GPU's fused attention kernels but not the CPU's.
        comparable = flops if device.type == "cuda" else flops_without_attention
        print(f"   {latent_tokens} latent tokens; {flops / 1e12:.3f} TFLOP per step analytically "
              f"({(flops - flops_without_attention) / 1e12:.3f} of it attention scores and sums); FlopCounterMode "
              f"counted {counted_step / 1e12:.3f} ({counted_step / comparable:.4f}x the analytic count"
              f"{'' if device.type == 'cuda' else ' without attention, which it cannot see on CPU'})", flush=True)
        results.update(flops_from="analytic", tflop_attention=(flops - flops_without_attention) / 1e12)
    else:
        flops = counted_step
        print(f"   {latent_tokens} latent tokens; {flops / 1e12:.3f} TFLOP per step counted by FlopCounterMode "
              f"on the real call{'' if device.type == 'cuda' else ' (without attention: not seen on CPU)'}",
              flush=True)
        results.update(flops_from="FlopCounterMode", tflop_attention=None)
    results.update(batch=batch, calls_per_step=calls, latent_tokens=int(latent_tokens), tflop_per_step=flops / 1e12,
                   tflop_counted=counted_step / 1e12, flops_include_attention=device.type == "cuda")

    def step_with(runner):
        forward = denoiser if runner is None else runner

        def step():
            output = None
            for _ in range(calls):
                output = forward(**serving_arguments, return_dict=False)
            return output

        return step

    repeats = args.repeats or (max(3, min(10, int(20 / max(calls * counted_s, 1e-3)))) if device.type == "cuda"
                               else 3)
    router = TransformerRouter(denoiser)
    eager_ms = None
    decode_s = 0.0
    if not args.skip_vae:
        results.update(time_decode(pipe, spec, shape, device, dtype, matmul))
        decode_s = results["vae_decode_s"]
    for name in args.backends:
        row: dict[str, Any] = {"backend": name}
        results["backends"][name] = row
        try:
            runner, row["setup_s"], row["label"] = prepare_runner(name, args, denoiser, arguments, eager_output,
                                                                  device, dtype)
        except BackendUnavailable as refusal:
            row["not_run"] = str(refusal)
            print(f"   {name:8s} not run: {refusal}", flush=True)
            continue
        except Exception as error:  # noqa: BLE001 - a backend that cannot build this denoiser: the others go on
            row["error"] = f"{type(error).__name__}: {error}"
            print(f"   {name:8s} failed to build: {row['error']}", flush=True)
            free_memory(device)
            continue
        with torch.inference_mode(), router.routed_to(None):
            # Eager is warm from the counted call.
            seconds, output = timed(step_with(runner), device, repeats, warmups=0 if name == "eager" else 2)
        step_s = statistics.median(seconds)
        eager_ms = eager_ms or (step_s * 1e3 if name == "eager" else None)
        row.update(
            ms_per_step=step_s * 1e3,
            tflops=flops / step_s / 1e12,
            fraction_of_matmul=flops / step_s / 1e12 / matmul["tflops"],
            speedup_over_eager=(eager_ms / (step_s * 1e3)) if eager_ms else None,
            relative_error=relative_error(first_output(output), eager_output),
            repeats=repeats,
        )
        print(f"   {row['label']:26s} {row['ms_per_step']:10.1f} ms/step {row['tflops']:8.2f} TFLOP/s "
              f"{100 * row['fraction_of_matmul']:6.1f}% of matmul  x{row['speedup_over_eager'] or float('nan'):.2f} "
              f"vs eager  rel.err {row['relative_error']:.2e}  (setup {row['setup_s']:.1f} s)", flush=True)
        if not args.skip_pipeline:
            render_steps = steps
            if device.type == "cuda" and args.render_max_s:
                # The family's step count, unless that would take longer than --render-max-s.
                affordable = int((args.render_max_s - decode_s) / step_s)
                render_steps = max(facts.limits.min_steps, min(steps, affordable))
            phases = whole_render(pipe, spec, shape, render_steps, router, runner, device)
            row.update(pipeline_s=phases["whole_s"], pipeline_steps=render_steps, pipeline_phases_s=phases)
            print(f"   {'':26s} whole pipeline (prompt, {render_steps} steps, decode, MP4): "
                  f"{row['pipeline_s']:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in phases.items() if k != 'whole_s')})",
                  flush=True)
    router.uninstall()
    if device.type == "cuda":
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"   peak GPU memory {results['peak_memory_gib']:.1f} GiB", flush=True)
    return results


def time_decode(pipe, spec: ModelSpec, shape, device: torch.device, dtype: torch.dtype,
                matmul: dict) -> dict[str, Any]:
    """The family's decode (decode_latents, the VAE decode the engine runs) of one video's
    latents at this shape: seconds, and FlopCounterMode's FLOPs of the same decode."""
    family = family_of(spec)
    request = engine_request(spec, shape, 2)
    latents = random_latents(pipe, spec, shape, device, dtype)

    def decode_video():
        noise = torch.Generator(device=device).manual_seed(0)  # decode-time noise of timestep-conditioned VAEs
        return family_module(family).decode_latents(pipe, latents, request, noise)

    with torch.inference_mode():
        flops, video = counted(decode_video)  # also the warm-up
        expected = (shape.num_frames, shape.height, shape.width)
        if tuple(video.shape[2:]) != expected:
            raise RuntimeError(f"decoded a video of {tuple(video.shape[2:])} (frames, height, width), not {expected}")
        del video
        seconds, _ = timed(decode_video, device, repeats=1, warmups=0)
    decode_s = seconds[0]
    row = {"vae_decode_s": decode_s, "vae_decode_tflop": flops / 1e12, "vae_decode_tflops": flops / decode_s / 1e12,
           "vae_decode_fraction_of_matmul": flops / decode_s / 1e12 / matmul["tflops"]}
    print(f"   VAE decode of one {shape.spec} video{' (tiled)' if spec.vae_tiling else ''}: {decode_s * 1e3:.0f} ms, "
          f"{row['vae_decode_tflops']:.2f} TFLOP/s ({100 * row['vae_decode_fraction_of_matmul']:.1f}% of matmul; "
          f"{flops / 1e12:.3f} TFLOP counted)", flush=True)
    return row


def prepare_runner(name: str, args, transformer, arguments, eager_output, device, dtype):
    """(runner or None for eager, setup seconds, label); raises BackendUnavailable when it cannot run here."""
    backend = create_backend(BackendConfig(name=name, onnx_provider=args.onnx_provider), device, dtype)
    backend.check_available()
    started = time.perf_counter()
    if name == "eager":
        return None, 0.0, backend.label
    backend.prepare(transformer)
    if name in ("compile", "fp8"):
        runner = backend.compiled_forward(transformer)
        with torch.inference_mode():  # compiling: the first calls
            serving = as_inference_tensors(arguments, device)
            for _ in range(backend.warmup_calls):
                runner(**serving, return_dict=False)
        synchronize(device)
        return runner, time.perf_counter() - started, backend.label
    directory = Path(tempfile.mkdtemp(prefix=f"engine-step-{name}-"))
    backend.build(transformer, arguments, eager_output, directory)
    signature = CallSignature.of_call(complete_arguments(transformer, arguments), eager_output, backend.graph_dtype)
    runner = backend.load(transformer, signature, directory)
    return runner, time.perf_counter() - started, backend.label


def mp4_encoder() -> Callable[[Any, int], bytes] | None:
    """farm's MP4 encoder, or None where PyAV is missing."""
    if importlib.util.find_spec("av") is None:
        return None
    from farm.postproc.encode import encode_mp4

    return encode_mp4


def whole_render(pipe, spec: ModelSpec, shape, steps: int, router, runner, device: torch.device,
                 encode_mp4: Callable[[Any, int], bytes] | None = None) -> dict[str, float]:
    """A render's phases as the engine runs them, with the denoiser's calls on runner:
    the prompt, the pipeline to latents, the family's decode to uint8 frames, the MP4."""
    from farm.engines.pipeline_engine import video_to_uint8_frames

    family = family_of(spec)
    encode_mp4 = encode_mp4 or mp4_encoder()
    request = engine_request(spec, shape, steps)
    image = conditioning_image(request)
    phases: dict[str, float] = {}
    synchronize(device)
    started = last = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal last
        synchronize(device)
        now = time.perf_counter()
        phases[name] = now - last
        last = now

    with torch.inference_mode():
        prompt = prompt_kwargs(pipe, spec, request, device)
        phase("prompt_s")
        generator = torch.Generator(device=device).manual_seed(request.seed)
        with router.routed_to(runner):
            output = pipe(**family_module(family).call_kwargs(request, image), **prompt, generator=generator,
                          output_type="latent", return_dict=False)
        phase("denoise_s")
        clip = decode(pipe, family, output, request, generator)
        frames = video_to_uint8_frames(clip.video, pipe.video_processor.config.do_normalize)
        phase("decode_s")
    if encode_mp4 is not None:
        encode_mp4(frames, request.fps)
        phase("mp4_s")
    phases["whole_s"] = time.perf_counter() - started
    return phases


def whole_pipeline(pipe, spec, shape, steps, router, runner, device, frames_to_uint8=None, encode_mp4=None) -> float:
    """Seconds from prompt to MP4 bytes with the denoiser's calls on runner (`whole_render`;
    frames_to_uint8 is not needed: the engine's conversion is used)."""
    return whole_render(pipe, spec, shape, steps, router, runner, device, encode_mp4)["whole_s"]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Entry point ------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    families = [family.value for family in BENCHES]
    parser.add_argument("--family", help=f"comma-separated, of {families} (default: all)")
    parser.add_argument("--models", help=f"comma-separated, of {sorted(MODELS)} (default: all of --family)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {list(BACKENDS)}")
    parser.add_argument("--layers", type=int,
                        help="every component's depth (blocks, layers, resnets per stage) capped at this")
    parser.add_argument("--shape", help="WIDTHxHEIGHTxFRAMES for every model instead of its family's default, "
                        "or min: each family's smallest")
    parser.add_argument("--steps", type=int, help="denoising steps of the whole render (default: the family's)")
    parser.add_argument("--repeats", type=int, help="timed denoising steps per backend (median reported)")
    parser.add_argument("--render-max-s", type=float, default=DEFAULT_RENDER_MAX_S,
                        help="on a GPU, fewer render steps where the family's would take longer (0: never)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="compute dtype (auto: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--onnx-provider", default="auto", choices=["auto", "tensorrt", "cuda", "cpu"])
    parser.add_argument("--skip-pipeline", action="store_true", help="time single steps only")
    parser.add_argument("--skip-vae", action="store_true", help="do not time the VAE decode")
    parser.add_argument("--tiny", action="store_true",
                        help="the family's tiny model stands in for the published one (a smoke test in seconds)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="smoke-test on CPU (needs --shape, and --layers or --tiny)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    chosen = [f.strip() for f in (args.family or "").split(",") if f.strip()]
    for family in chosen:
        if family not in families:
            parser.error(f"unknown family {family!r}; choose from {families}")
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    args.models = [name for name, spec in MODELS.items()
                   if (not models or name in models) and (not chosen or spec.family in chosen)]
    if not args.models:
        parser.error("--family and --models leave no model to run")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in args.backends:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
    # Eager first (the reference for speed-ups and errors), fp8 last (it changes the model in place).
    args.backends = [b for b in BACKENDS if b in args.backends]
    if args.shape and args.shape != "min":
        parse_shape(args.shape)
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    return args


def published_depth(spec: ModelSpec) -> int:
    """The denoiser's published depth (transformer blocks, or a UNet's layers per stage)."""
    family = family_of(spec)
    config = published_configs(family, None)[family_facts(family).denoiser]
    return config.get("num_layers", config.get("layers_per_block"))


def refuse_cpu_unless_small(args) -> str | None:
    """Why this run cannot go ahead on a machine without a GPU, or None if it may."""
    if torch.cuda.is_available():
        return None
    published = min(published_depth(MODELS[name]) for name in args.models)
    if not args.allow_cpu:
        return ("No GPU here. Full-size models' steps take minutes each on a CPU and the numbers would say nothing "
                "about a render farm's GPUs. For a smoke test of this script, run with --allow-cpu --layers 1 "
                "--shape min --steps 2 (add --tiny for the tiny models' widths, seconds instead of minutes).")
    if not (args.tiny or (args.layers and args.layers < published)) or not args.shape:
        return (f"--allow-cpu needs a smaller --layers (below {published}) or --tiny, and a small --shape "
                "(e.g. --layers 1 --shape min): full size does not fit a CPU smoke test.")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    refusal = refuse_cpu_unless_small(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or 'unknown'}, {torch.get_num_threads()} threads)"
    matmul = matmul_rate(device, dtype)
    header = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "matmul": matmul,
        "smoke_test": device.type != "cuda",
        "layers": args.layers,
        "tiny": args.tiny,
    }
    print(f"{header['date']}  {name}, {header['dtype']}  torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"matrix product {matmul['size']}^3 {matmul['dtype']}: {matmul['tflops']:.2f} TFLOP/s measured now")
    if header["smoke_test"]:
        print("SMOKE TEST on CPU with fewer layers and a small shape: not a measurement of the farm's GPUs.")
    runs = []
    failed = False
    for model in args.models:
        try:
            runs.append(run_model(MODELS[model], args, device, dtype, matmul))
        except Exception as error:  # noqa: BLE001 - one model's failure (e.g. out of memory) is recorded
            failed = True
            runs.append({"model": model, "family": MODELS[model].family, "error": f"{type(error).__name__}: {error}"})
            print(f"   {model} FAILED: {runs[-1]['error']}", flush=True)
        # The model's weights go with run_model's frame; give the memory back before the next one.
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if args.json:  # rewritten after every model, so a run cut short keeps what it measured
            args.json.write_text(json.dumps({**header, "runs": runs}, indent=2, default=str) + "\n")
    if args.json:
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
