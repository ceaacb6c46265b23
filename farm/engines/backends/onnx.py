"""The onnx backend: the transformer exported to ONNX per shape, run by ONNX Runtime.

An engine build exports the transformer with torch.onnx.export (the torch.export-based
exporter, which needs onnxscript) on the exact call the pipeline makes at that shape:
every dimension is fixed, the non-tensor arguments (such as a family's latent frames,
height and width) are baked in, and the rest become named graph inputs. Weights go to an
external-data file beside the graph, so models past protobuf's 2 GiB fit.

Execution providers, in `BackendConfig.onnx_provider` terms:

- tensorrt: TensorRT through ONNX Runtime, FP16 graph and FP16 TensorRT kernels, with
  the TensorRT engine and timing caches in the build directory, so a replica that loads
  the build skips TensorRT's engine build;
- cuda: ONNX Runtime's CUDA kernels on the FP16 graph;
- cpu: the CPU provider on a float32 graph (CPU engines compute in float32).

`OnnxTransformerRunner` stands in for the transformer's forward: it takes the same
arguments, hands the tensors to ONNX Runtime through I/O binding (no host copies on a
GPU: ONNX Runtime reads and writes torch's memory directly, on torch's stream), and
returns what the forward returns, in the model's dtype.

onnxruntime is needed to serve builds; onnx and onnxscript only to make them. All
three are imported when first used.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from farm.engines.backends.backend import (
    RELATIVE_TOLERANCE,
    Backend,
    BackendUnavailable,
    CallSignature,
    Runner,
    bind_forward_arguments,
    class_forward,
    complete_arguments,
    copy_unrouted,
    dtype_name,
    first_output,
)

ONNX_FILE = "transformer.onnx"
ONNX_WEIGHTS_FILE = "transformer.onnx.data"
TENSORRT_CACHE_DIR = "tensorrt"
OUTPUT_NAME = "sample"
TENSORRT_WORKSPACE_BYTES = 16 * 1024**3

_EXECUTION_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.bool: np.bool_,
}
_ONNX_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
}


def import_onnxruntime():
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        raise BackendUnavailable(
            "the onnx backend needs onnxruntime (pip install 'farm[onnx]'; onnxruntime-gpu on GPU nodes)"
        ) from None


class OnnxBackend(Backend):
    """Per-shape ONNX graphs of the transformer, run by ONNX Runtime."""

    name: ClassVar[str] = "onnx"
    builds_per_shape: ClassVar[bool] = True

    def __init__(self, config, device, dtype):
        super().__init__(config, device, dtype)
        self._provider: str | None = None

    @property
    def provider(self) -> str:
        """tensorrt, cuda or cpu: the configured provider, or auto's choice for this device."""
        if self._provider is None:
            self._provider = self._resolve_provider()
        return self._provider

    def _resolve_provider(self) -> str:
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        configured = self.config.onnx_provider
        if self.device.type == "cpu":
            if configured not in ("auto", "cpu"):
                raise BackendUnavailable(
                    f"onnx_provider {configured} runs on a GPU; this engine runs on cpu (use auto or cpu)"
                )
            return "cpu"
        if self.device.type != "cuda":
            raise BackendUnavailable(f"the onnx backend runs on cpu or cuda, not {self.device.type}")
        if configured == "cpu":
            raise BackendUnavailable(
                "onnx_provider cpu would run a GPU engine's transformer on the CPU; use auto, tensorrt or cuda"
            )
        wanted = ["tensorrt", "cuda"] if configured == "auto" else [configured]
        for provider in wanted:
            if _EXECUTION_PROVIDERS[provider] in available:
                return provider
        raise BackendUnavailable(
            f"onnxruntime {ort.__version__} here offers {available}, not "
            f"{' or '.join(_EXECUTION_PROVIDERS[p] for p in wanted)}: a GPU engine needs onnxruntime-gpu "
            "(and TensorRT's libraries for the tensorrt provider)"
        )

    @property
    def graph_dtype(self) -> torch.dtype:
        """FP16 on a GPU (what TensorRT and the CUDA kernels run fastest); float32 on CPU."""
        return torch.float32 if self.provider == "cpu" else torch.float16

    @property
    def label(self) -> str:
        return f"onnx-{self.provider}-{dtype_name(self.graph_dtype)}"

    @property
    def tolerance(self) -> float:
        # An FP16 graph checked against bfloat16 eager is held to the looser of the two.
        return max(RELATIVE_TOLERANCE[self.graph_dtype], RELATIVE_TOLERANCE.get(self.dtype, 0.0))

    def check_available(self) -> None:
        self.provider  # resolving it checks onnxruntime and the provider  # noqa: B018

    def key_fields(self) -> dict[str, Any]:
        # What a replica must match to run a build. onnx and onnxscript made the graph but
        # need not be installed where it runs; TensorRT's engine cache is checked by
        # onnxruntime itself, which rebuilds an engine made by other TensorRT libraries.
        ort = import_onnxruntime()
        return {"backend": self.label, "provider": self.provider, "graph_dtype": dtype_name(self.graph_dtype),
                "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__}}

    def build(self, transformer: torch.nn.Module, arguments: Mapping[str, Any], reference: torch.Tensor,
              directory: Path) -> None:
        for package in ("onnx", "onnxscript"):
            if importlib.util.find_spec(package) is None:
                raise BackendUnavailable(
                    f"exporting to ONNX needs {package} (pip install 'farm[onnx]'); "
                    "serving a build needs only onnxruntime"
                )
        arguments = complete_arguments(transformer, arguments)
        signature = CallSignature.of_call(arguments, reference, self.graph_dtype)
        model_dtype = reference.dtype
        # Export from a copy in the graph's dtype; the served model keeps its own.
        exported = transformer if model_dtype == self.graph_dtype else copy_unrouted(transformer).to(self.graph_dtype)
        try:
            flat = [tensor.to(self.device) for tensor in signature.flatten(arguments)]
            with torch.no_grad():
                torch.onnx.export(
                    _FlatTransformerCall(exported, signature).eval(),
                    tuple(flat),
                    str(directory / ONNX_FILE),
                    input_names=[spec.input_name for spec in signature.tensor_specs],
                    output_names=[OUTPUT_NAME],
                    dynamo=True,
                    external_data=True,
                    optimize=True,
                    verbose=False,
                )
        finally:
            del exported
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.provider == "tensorrt":
            (directory / TENSORRT_CACHE_DIR).mkdir(exist_ok=True)

    def load(self, transformer: torch.nn.Module, signature: CallSignature, directory: Path) -> Runner:
        return OnnxTransformerRunner(self.session(directory), signature, transformer, self.device)

    def session(self, directory: Path):
        """An InferenceSession on the build's graph, with the provider actually running checked."""
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: TensorRT's fallback notes are expected
        if self.provider == "cpu":
            options.intra_op_num_threads = torch.get_num_threads()
            # Idle ONNX Runtime threads spin by default, taking the cores from torch's VAE
            # decode and scheduler that run between transformer calls.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(
            str(directory / ONNX_FILE), sess_options=options, providers=self._providers(directory)
        )
        wanted = _EXECUTION_PROVIDERS[self.provider]
        # onnxruntime silently drops a provider it cannot start; a CPU fallback on a GPU
        # node would be a very slow engine, so refuse instead.
        if session.get_providers()[0] != wanted:
            raise BackendUnavailable(f"onnxruntime could not start {wanted} (it runs {session.get_providers()})")
        return session

    def _providers(self, directory: Path) -> list:
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        # ONNX Runtime computes on torch's stream, so no synchronisation is needed around a call.
        stream = {"has_user_compute_stream": "1",
                  "user_compute_stream": str(torch.cuda.current_stream(self.device).cuda_stream)}
        cuda = ("CUDAExecutionProvider", {"device_id": str(device_id), **stream})
        if self.provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        cache = str(directory / TENSORRT_CACHE_DIR)
        tensorrt = (
            "TensorrtExecutionProvider",
            {
                "device_id": str(device_id),
                "trt_fp16_enable": "True",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache,
                "trt_max_workspace_size": str(TENSORRT_WORKSPACE_BYTES),
                **stream,
            },
        )
        # Nodes TensorRT cannot take run on the CUDA provider, not the CPU.
        return [tensorrt, cuda, "CPUExecutionProvider"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "provider": self.provider, "graph_dtype": dtype_name(self.graph_dtype)}


class _FlatTransformerCall(torch.nn.Module):
    """The transformer as a function of flat tensors: what gets exported."""

    def __init__(self, transformer: torch.nn.Module, signature: CallSignature):
        super().__init__()
        self.transformer = transformer
        self.signature = signature

    def forward(self, *flat: torch.Tensor) -> torch.Tensor:
        arguments = self.signature.rebuild(list(flat))
        return first_output(class_forward(self.transformer)(**arguments, return_dict=False))


class OnnxTransformerRunner:
    """Calls an ONNX Runtime session with the transformer's forward arguments."""

    def __init__(self, session, signature: CallSignature, transformer: torch.nn.Module, device: torch.device):
        self.session = session
        self.signature = signature
        self.transformer = transformer
        self.device = torch.device(device)
        self.device_type = "cuda" if self.device.type == "cuda" else "cpu"
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else 0
        graph_inputs = [graph_input.name for graph_input in session.get_inputs()]
        expected = [spec.input_name for spec in signature.tensor_specs]
        if graph_inputs != expected:
            raise ValueError(f"the ONNX graph takes {graph_inputs}, its build record says {expected}")
        graph_output = session.get_outputs()[0]
        self.output_name = graph_output.name
        try:
            self.graph_output_dtype = _ONNX_TYPES[graph_output.type]
        except KeyError:
            raise ValueError(f"the ONNX graph returns {graph_output.type}, not a float tensor") from None
        self.output_dtype = getattr(torch, signature.output_dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = bind_forward_arguments(self.transformer, args, kwargs)
        return_dict = arguments.pop("return_dict", True)
        flat = self.signature.flatten(arguments)
        binding = self.session.io_binding()
        inputs = []  # kept alive until the run ends: ONNX Runtime reads their memory
        for spec, tensor in zip(self.signature.tensor_specs, flat):
            tensor = tensor.to(self.device).contiguous()
            inputs.append(tensor)
            binding.bind_input(spec.input_name, self.device_type, self.device_id, _numpy_dtype(tensor.dtype),
                               tuple(tensor.shape), tensor.data_ptr())
        output = torch.empty(self.signature.output_shape, dtype=self.graph_output_dtype, device=self.device)
        binding.bind_output(self.output_name, self.device_type, self.device_id, _numpy_dtype(output.dtype),
                            tuple(output.shape), output.data_ptr())
        self.session.run_with_iobinding(binding)
        sample = output.to(self.output_dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)


def _numpy_dtype(dtype: torch.dtype):
    try:
        return _NUMPY_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"ONNX Runtime I/O binding has no numpy type for {dtype}") from None
