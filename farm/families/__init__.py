"""Model families: one module per family holds everything farm knows of it.

`Family` names the families and `FAMILY_MODULES` says which module describes each. A
family module offers what `FamilyModule` lists:

- ``FACTS``, a `FamilyFacts`: the limits of a spec and the defaults it gets (each with
  why), why the family needs more than one denoising step, its latent compression, the
  constants of its memory estimate, the tiny random-weight model farm writes for it, and
  the schedulers whose state a checkpoint can keep;
- what the engine does with its diffusers pipelines: ``pipeline_classes()``,
  ``resumable_pipelines()``, ``call_kwargs``, ``encode_prompt``, ``decode_latents`` and
  ``build_tiny_pipelines``;
- what the memory estimate reads from a pipeline's config files: ``joint_text_tokens``
  and ``vae_decode_tile``.

Importing this package or a family module imports neither torch nor diffusers (the
gateway reads limits from them): the functions that need them import them inside.

Most families' pipelines run classifier-free guidance as one batch of two
(`FamilyFacts.guidance_batch` says which do not) and open the transformer's
``cache_context`` around each call (First-Block Cache keeps its state per context).

Adding a family: its module, a member of `Family`, a line in `FAMILY_MODULES`, and
its tests.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from farm.domain.limits import ModelLimits, RenderDefaults
from farm.domain.spec import Task

if TYPE_CHECKING:
    from PIL import Image

    from farm.domain.engine import EngineRequest


class Family(str, enum.Enum):
    LTX_VIDEO = "ltx-video"
    COGVIDEOX = "cogvideox"
    WAN = "wan"
    LTX_2 = "ltx-2"
    HUNYUAN_VIDEO_1_5 = "hunyuanvideo-1.5"
    STABLE_VIDEO_DIFFUSION = "stable-video-diffusion"
    ANIMATEDIFF = "animatediff"


FAMILY_MODULES: dict[Family, str] = {
    Family.LTX_VIDEO: "farm.families.ltx_video",
    Family.COGVIDEOX: "farm.families.cogvideox",
    Family.WAN: "farm.families.wan",
    Family.LTX_2: "farm.families.ltx2",
    Family.HUNYUAN_VIDEO_1_5: "farm.families.hunyuan_video15",
    Family.STABLE_VIDEO_DIFFUSION: "farm.families.stable_video_diffusion",
    Family.ANIMATEDIFF: "farm.families.animatediff",
}


class StepCarry(str, enum.Enum):
    """What a scheduler needs from outside itself to continue at a later step, which a
    checkpoint keeps (`farm.engines.checkpoint`)."""

    STEP_INDEXED = "step-indexed"
    """It reads its sigmas at its step index: on resume its begin index is set."""
    DPM_CARRY = "dpm-carry"
    """The pipeline's loop passes it the previous x0 prediction and timestep."""
    STATELESS = "stateless"
    """Each step depends on its timestep alone."""
    MULTISTEP = "multistep"
    """It keeps a history of model outputs between steps (UniPC, DPM-Solver++ multistep):
    the checkpoint keeps its whole state after the step and puts it back on resume."""


@dataclasses.dataclass(frozen=True)
class LatentCompression:
    """How many pixels and frames one latent position stands for."""

    spatial: int
    """Pixels per side of one latent position (the VAE's spatial compression)."""
    temporal: int
    """Frames per latent frame after the first (the VAE's temporal compression)."""
    patch: int
    """Latent positions per side of one transformer token (the transformer's patch)."""

    @property
    def token_pixels(self) -> int:
        """Pixels per side of one transformer token."""
        return self.spatial * self.patch

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal + 1


@dataclasses.dataclass(frozen=True)
class PipelineSizes:
    """What the memory estimate (`farm.planning.memory`) needs to know of one pipeline."""

    parameters: dict[str, int]
    """Parameters per component (transformer, text_encoder, vae)."""
    hidden_size: int
    """The transformer's width (attention heads x head dimension)."""
    joint_text_tokens: int
    """Text tokens the transformer attends to together with the video's; 0 when text
    comes in through cross-attention."""
    vae_channels: int
    """Channels of the VAE decoder's last, full-resolution stage."""
    vae_patch_size: int
    """Pixels per side that one position of that stage unpacks into."""
    vae_tile: tuple[int, int]
    """(height, width) of a spatial tile of the tiled decode."""
    described_by: str
    """Where these sizes come from: the directory read, or the published model assumed."""


@dataclasses.dataclass(frozen=True)
class MemoryFacts:
    """A family's constants in the memory estimate (`farm.planning.memory`)."""

    vae_widths: int
    """Copies of the VAE decoder's last stage alive at its peak (counted on the meta device)."""
    decode_frames: int | None
    """Frames the VAE decodes at once without tiling; None: the whole video."""
    tiled_decode_frames: int | None
    """Frames the VAE decodes at once with ``backend.vae_tiling``; None: the whole video."""
    published: PipelineSizes
    """The family's published model, which stands in where a model's files cannot be read."""


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """The tiny random-weight model farm writes for a family (`farm.engines.tiny`) and
    serves when a config names no models."""

    name: str
    directories: dict[Task, str]
    """Per task, the directory (under the models directory) of its pipeline; tasks may share one."""
    defaults: RenderDefaults
    """Small defaults, for a quick demo."""


@dataclasses.dataclass(frozen=True)
class FamilyFacts:
    """What farm knows of a family without loading a pipeline."""

    limits: ModelLimits
    """What a spec may ask of the family's models (a model's config may override them)."""
    defaults: RenderDefaults
    """Values for the fields a spec leaves empty (a model's config may override them)."""
    min_steps_reason: str | None
    """Why the family cannot denoise in fewer than ``limits.min_steps``, for the refusal
    of a spec with fewer; None when one step is enough."""
    compression: LatentCompression
    memory: MemoryFacts
    tiny: TinyModel
    checkpoint_schedulers: dict[str, StepCarry]
    """Scheduler class names whose state a checkpoint can keep, and how."""
    denoiser: str = "transformer"
    """The pipeline component that denoises ("transformer", or "unet" for UNet families):
    what the backends prepare, the preemption checks hook and the memory estimate reads."""
    uses_prompt: bool = True
    """Whether the family's pipelines take a text prompt (image-only families do not: a
    spec for them may leave it empty, and one that sends a prompt is told it is unused)."""
    audio: bool = False
    """Whether its renders carry a generated audio track (`DecodedClip.audio`)."""
    lora: bool = True
    """Whether its pipelines load LoRA adapters (diffusers gives them a LoRA loader)."""
    guidance_batch: int = 2
    """The batch of one guided transformer pass: 2 where the pipeline runs the conditional
    and unconditional halves together, 1 where it runs them one after the other (the
    memory estimate's peak holds one pass)."""


@dataclasses.dataclass
class DecodedClip:
    """What a family's decode gives back when there is more than the video."""

    video: Any
    """Tensor (B, C, F, H, W) in [-1, 1], as `decode_latents` returns."""
    audio: Any | None = None
    """Waveform (channels, samples), float in [-1, 1], time-aligned with the video's first frame."""
    audio_sample_rate: int | None = None


@runtime_checkable
class FamilyModule(Protocol):
    """What a family module offers. The functions import torch and diffusers when called."""

    FAMILY: Family
    FACTS: FamilyFacts

    def pipeline_classes(self) -> dict[Task, type]:
        """The diffusers pipeline class that serves each task."""

    def resumable_pipelines(self) -> tuple[type, ...]:
        """The pipeline classes whose denoising a checkpoint can resume (their loop runs over
        the scheduler's timesteps and their set-up draws the same values, or none, again)."""

    def call_kwargs(self, request: EngineRequest, image: Image.Image | None) -> dict:
        """Pipeline arguments for everything but the prompt (embeddings come from `encode_prompt`)."""

    def encode_prompt(self, pipe: Any, request: EngineRequest, device: Any) -> dict:
        """Prompt embeddings, as keyword arguments for the pipeline call."""

    def decode_latents(self, pipe: Any, latents: Any, request: EngineRequest, generator: Any) -> Any:
        """The pipeline's own decode of its ``output_type="latent"`` output: a video tensor
        (B, C, F, H, W) in [-1, 1], or a `DecodedClip` (with audio). A module may define
        ``decode_output(pipe, output, request, generator)`` instead, given the call's whole
        output tuple (a pipeline that returns latents of several kinds)."""

    def build_tiny_pipelines(self, text_encoder: Any, tokenizer: Any) -> dict[Task, Any]:
        """Random-weight pipelines of the family's tiny model (`FACTS.tiny`), by task; a task
        whose directory another task shares may be left out."""

    def joint_text_tokens(self, transformer_config: Mapping[str, Any]) -> int:
        """Text tokens the transformer of that config attends to together with the video's."""

    def vae_decode_tile(self, vae_config: Mapping[str, Any]) -> tuple[int, int]:
        """(height, width) of a spatial tile of the tiled decode by the VAE of that config."""


def family_module(family: Family | str) -> FamilyModule:
    """The module describing one model family (it imports neither torch nor diffusers)."""
    try:
        name = FAMILY_MODULES[Family(family)]
    except (KeyError, ValueError):
        known = [f.value for f in FAMILY_MODULES]
        raise ValueError(f"no model family {family!r} (known: {known})") from None
    return importlib.import_module(name)


def family_facts(family: Family | str) -> FamilyFacts:
    """What farm knows of a family without loading a pipeline."""
    return family_module(family).FACTS


def tiny_models() -> list[tuple[Family, TinyModel]]:
    """Every family's tiny model, in the registry's order."""
    return [(family, family_facts(family).tiny) for family in FAMILY_MODULES]


def tiny_words(t5_tokenizer: Any) -> list[str]:
    """The whole words of farm's tiny T5 vocabulary (`farm.engines.tiny`), sorted: what a
    family's own tiny tokenizer learns to keep as one token each."""
    return sorted({piece[1:] for piece in t5_tokenizer.get_vocab() if piece.startswith("\u2581") and len(piece) > 1})


def checkpoint_schedulers() -> dict[str, StepCarry]:
    """Every family's schedulers whose state a checkpoint can keep, by class name."""
    return {name: carry for family in FAMILY_MODULES
            for name, carry in family_facts(family).checkpoint_schedulers.items()}


__all__ = [
    "FAMILY_MODULES",
    "DecodedClip",
    "Family",
    "FamilyFacts",
    "FamilyModule",
    "LatentCompression",
    "MemoryFacts",
    "PipelineSizes",
    "StepCarry",
    "TinyModel",
    "checkpoint_schedulers",
    "family_facts",
    "family_module",
    "tiny_models",
    "tiny_words",
]
