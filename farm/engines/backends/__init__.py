"""Backends: how a model's transformer runs. One module per backend, one interface (`base.Backend`).

- `eager`: the diffusers model as loaded (bfloat16 on a GPU, float32 on CPU);
- `compile`: torch.compile, CUDA graphs on a GPU, built per shape;
- `fp8`: FP8 linear layers (Ada/Hopper and newer) plus compile;
- `onnx`: per-shape ONNX graphs run by ONNX Runtime (TensorRT, CUDA or CPU provider);
- `first_block_cache`: step caching, combinable with eager, compile and fp8.

Classifier-free guidance needs nothing here: every family's pipelines already run the
conditional and unconditional passes as one batch of two (``torch.cat([latents] * 2)``
before a single transformer call per step; `farm.families`), and the shape buckets of
builds count that batch.

Importing this package imports neither torch nor a backend; `create_backend` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from farm.engines.backends.shapes import ShapeBucket, parse_shape

if TYPE_CHECKING:
    import torch

    from farm.config import BackendConfig
    from farm.engines.backends.backend import Backend

BACKEND_CLASSES: dict[str, str] = {
    "eager": "farm.engines.backends.eager:EagerBackend",
    "compile": "farm.engines.backends.compile:CompileBackend",
    "fp8": "farm.engines.backends.fp8:Fp8Backend",
    "onnx": "farm.engines.backends.onnx:OnnxBackend",
}


def create_backend(config: BackendConfig, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend a config names, for one device and compute dtype (not yet checked or applied)."""
    try:
        module_name, class_name = BACKEND_CLASSES[config.name].split(":")
    except KeyError:
        raise ValueError(f"no backend named {config.name!r} (known: {sorted(BACKEND_CLASSES)})") from None
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class(config, device, dtype)


__all__ = ["BACKEND_CLASSES", "ShapeBucket", "create_backend", "parse_shape"]
