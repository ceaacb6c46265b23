"""The compile backend: torch.compile of the transformer, built ahead of time per shape.

On a GPU it compiles with mode="reduce-overhead": Inductor kernels replayed as CUDA
graphs, which is what removes the per-kernel launch cost of a fixed-shape denoising
loop. Shapes are static (dynamic=False), so each shape bucket is its own graph.

An engine build compiles the transformer on the pipeline's own call at that shape,
then saves PyTorch's compile caches (`torch.compiler.save_cache_artifacts`: the FX
graph, AOTAutograd and Inductor/Triton kernel caches). A replica loads them before
compiling at start, so its warm-up call finds every kernel already built instead of
generating and compiling them again.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from farm.engines.backends.backend import (
    Backend,
    BackendUnavailable,
    CallSignature,
    Runner,
    as_inference_tensors,
    class_forward,
    dtype_name,
)

COMPILE_ARTIFACTS = "compile-artifacts.bin"
# One compiled graph per shape bucket and task: raise Dynamo's recompile limit (8 by
# default) so that an engine with many builds never silently falls back to eager.
RECOMPILE_LIMIT = 64


class CompileBackend(Backend):
    """torch.compile of the transformer's forward; CUDA graphs on a GPU."""

    name: ClassVar[str] = "compile"
    builds_per_shape: ClassVar[bool] = True

    def __init__(self, config, device, dtype):
        super().__init__(config, device, dtype)
        self._compiled: dict[int, Runner] = {}

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.device.type == "cuda"

    @property
    def mode(self) -> str:
        return "reduce-overhead" if self.uses_cuda_graphs else "default"

    @property
    def label(self) -> str:
        graphs = "+cudagraphs" if self.uses_cuda_graphs else ""
        return f"{self.name}{graphs}-{dtype_name(self.dtype)}"

    @property
    def warmup_calls(self) -> int:
        # CUDA graph trees run the first call eagerly and record on the next one.
        return 3 if self.uses_cuda_graphs else 1

    def check_available(self) -> None:
        if self.device.type == "cpu":
            compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
            if not any(compiler and shutil.which(compiler) for compiler in compilers):
                raise BackendUnavailable(
                    f"the {self.name} backend on CPU needs a C++ compiler (g++ or clang++) on PATH for Inductor"
                )
        elif self.device.type == "cuda":
            if importlib.util.find_spec("triton") is None:
                raise BackendUnavailable(f"the {self.name} backend on a GPU needs triton (it ships with CUDA torch)")
        else:
            raise BackendUnavailable(f"the {self.name} backend runs on cpu or cuda, not {self.device.type}")

    def key_fields(self) -> dict[str, Any]:
        versions = {"torch": torch.__version__}
        if self.device.type == "cuda":
            import triton

            versions["triton"] = triton.__version__
        return {"backend": self.label, "compile_mode": self.mode, "versions": versions}

    def build(self, transformer: torch.nn.Module, arguments: Mapping[str, Any], reference: torch.Tensor,
              directory: Path) -> None:
        runner = self.compiled_forward(transformer)
        # Serving runs under inference mode on inference tensors; Dynamo guards on both.
        arguments = as_inference_tensors(arguments, self.device)
        with torch.inference_mode():
            for _ in range(self.warmup_calls):
                runner(**arguments, return_dict=False)
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            raise RuntimeError("torch.compile produced no cache artifacts to save (are its caches disabled?)")
        data, _info = artifacts
        (directory / COMPILE_ARTIFACTS).write_bytes(data)

    def load(self, transformer: torch.nn.Module, signature: CallSignature, directory: Path) -> Runner:
        torch.compiler.load_cache_artifacts((directory / COMPILE_ARTIFACTS).read_bytes())
        return self.compiled_forward(transformer)

    def compiled_forward(self, transformer: torch.nn.Module) -> Runner:
        """The model's own forward, compiled once per transformer and shared by its shapes."""
        key = id(transformer)
        if key not in self._compiled:
            _raise_recompile_limit()
            compiled = torch.compile(class_forward(transformer), mode=self.mode, dynamic=False)
            self._compiled[key] = _with_fresh_outputs(compiled) if self.uses_cuda_graphs else compiled
        return self._compiled[key]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compile_mode": self.mode, "cuda_graphs": self.uses_cuda_graphs}


def _with_fresh_outputs(compiled: Callable[..., Any]) -> Runner:
    """A CUDA-graph runner whose outputs survive the next replay.

    A replay writes into the same static output buffers; the pipeline keeps the noise
    prediction past the next call only rarely, but a copy of one latent-sized tensor
    per step is cheap insurance. Marking a step begin tells graph trees that the
    previous outputs are no longer live.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        output = compiled(*args, **kwargs)
        if isinstance(output, tuple):
            return tuple(item.clone() if isinstance(item, torch.Tensor) else item for item in output)
        if hasattr(output, "sample"):
            output.sample = output.sample.clone()
        return output

    return run


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name first
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            return
