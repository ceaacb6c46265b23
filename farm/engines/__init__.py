"""Engines: diffusers pipelines behind the small `Engine` protocol of `farm.domain.engine`.

What differs between model families (which pipeline class serves which task, how a
request drives it, the tiny random-weight models) is in the family modules of
`farm.families`; `DiffusersEngine` (in `pipeline_engine`) does the rest for every
family. Importing this package does not import torch or diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from farm.config import ModelConfig
    from farm.engines.pipeline_engine import DiffusersEngine


def load_engine(model: ModelConfig) -> DiffusersEngine:
    """Loads the model's weights onto its device and returns a ready engine."""
    parallel = model.context_parallel
    if parallel is not None:
        from farm.engines.parallel import ParallelEngine

        return ParallelEngine(model, parallel.degree, parallel.mode, parallel.attention_backend, parallel.timeout_s)
    from farm.engines.pipeline_engine import DiffusersEngine

    return DiffusersEngine(model)


__all__ = ["load_engine"]
