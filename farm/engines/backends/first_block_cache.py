"""First-Block Cache: skip the rest of the transformer on steps where its first block barely changes.

At every step the first block runs. When its residual (output minus input) differs
from the previous step's by less than `threshold`, relative to that previous residual
(mean absolute values), the remaining blocks are skipped and the residual they added at
the last full step is added instead. Threshold 0 never skips. Off by default: it
trades quality for speed, and how much depends on the model and the step count.

diffusers 0.42 implements it as hooks (`diffusers.hooks.FirstBlockCacheConfig`,
applied by the models' `enable_cache`); its state lives per `cache_context`, which every
family's pipelines open around each transformer call ("cond_uncond": guidance runs as
one batch, so both halves share one decision). This module wraps it
with the checks and the state reset an engine needs.
"""

from __future__ import annotations

import torch


def transformer_block_count(transformer: torch.nn.Module) -> int:
    """How many blocks the model's block lists hold (the hooks go on these)."""
    return sum(len(child) for child in transformer.children() if isinstance(child, torch.nn.ModuleList))


def apply_first_block_cache(transformer: torch.nn.Module, threshold: float) -> None:
    """Installs First-Block Cache on a diffusers transformer; raises ValueError when it cannot."""
    from diffusers.hooks import FirstBlockCacheConfig

    if threshold < 0:
        raise ValueError(f"first_block_cache_threshold must be >= 0, got {threshold}")
    if not hasattr(transformer, "enable_cache"):
        raise ValueError(f"{type(transformer).__name__} does not support diffusers' step caches")
    blocks = transformer_block_count(transformer)
    # The hooks treat the first block as the probe and the last as the one whose residual is kept.
    if blocks < 2:
        raise ValueError(
            f"first-block cache needs at least 2 transformer blocks; {type(transformer).__name__} has {blocks}"
        )
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def reset_first_block_cache(transformer: torch.nn.Module) -> None:
    """Forgets the previous step, so a render never reuses residuals of another one."""
    if getattr(transformer, "is_cache_enabled", False):
        transformer._reset_stateful_cache()
