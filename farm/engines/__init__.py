"""Engines: diffusers pipelines behind the small `Engine` protocol of `farm.domain.engine`.

One module per model family says which pipeline class serves which task and how a
request drives it; `DiffusersEngine` (in `pipeline_engine`) does the rest for every
family. Importing this package does not import torch or diffusers: the gateway
imports it (through `farm.config` and `farm.engines.tiny`) and needs neither.

A family module offers:

- ``PIPELINE_CLASSES: dict[Task, type[DiffusionPipeline]]``, the tasks it serves;
- ``call_kwargs(request, image) -> dict``, pipeline arguments other than the prompt;
- ``encode_prompt(pipe, request, device) -> dict``, prompt embeddings as pipeline arguments;
- ``decode_latents(pipe, latents, request, generator) -> Tensor``, the pipeline's own
  decode of ``output_type="latent"`` output, giving a (B, C, F, H, W) video in [-1, 1];
- ``build_tiny_pipelines(text_encoder, tokenizer) -> dict[Task, DiffusionPipeline]``,
  random-weight pipelines for `farm.engines.tiny`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from farm.config import Family, ModelConfig

if TYPE_CHECKING:
    from farm.engines.pipeline_engine import DiffusersEngine

FAMILY_MODULES: dict[Family, str] = {
    Family.LTX_VIDEO: "farm.engines.ltx",
    Family.COGVIDEOX: "farm.engines.cogvideox",
}


def family_module(family: Family) -> ModuleType:
    """The module describing one model family (imports torch and diffusers)."""
    try:
        name = FAMILY_MODULES[Family(family)]
    except (KeyError, ValueError):
        known = [f.value for f in FAMILY_MODULES]
        raise ValueError(f"no engine for model family {family!r} (known: {known})") from None
    return importlib.import_module(name)


def load_engine(model: ModelConfig) -> DiffusersEngine:
    """Loads the model's weights onto its device and returns a ready engine."""
    from farm.engines.pipeline_engine import DiffusersEngine

    return DiffusersEngine(model)


__all__ = ["FAMILY_MODULES", "family_module", "load_engine"]
