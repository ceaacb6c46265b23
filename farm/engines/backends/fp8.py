"""The fp8 backend: FP8 (e4m3) linear layers in the transformer blocks, then torch.compile.

The matrix products of the attention and feed-forward layers run on FP8 tensor
cores: weights are stored in float8_e4m3fn with one scale per output channel, and
activations are scaled per row (per token) at run time. Products accumulate in
float32 and come out in bfloat16. Embedding, time-step and output projections stay
in bfloat16: they are a sliver of the work and the most sensitive to rounding.

torchao's Float8DynamicActivationFloat8WeightConfig does this when torchao is
installed; otherwise `Float8Linear` below does the same with torch._scaled_mm.
Without compilation the activation scaling costs more than FP8 saves, so this
backend is the compile backend on a quantized model (and builds per shape the same
way). It needs a GPU with FP8 tensor cores: compute capability 8.9 (Ada) runs
per-tensor scales, 9.0 (Hopper) and newer per-row scales.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch

from farm.engines.backends.backend import (
    FP8_RELATIVE_TOLERANCE,
    BackendUnavailable,
    dtype_name,
)
from farm.engines.backends.compile import CompileBackend

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
# FP8 tensor-core products need both matrix dimensions of the weight in multiples of 16.
FP8_ALIGNMENT = 16
MIN_FP8_CAPABILITY = (8, 9)
ROWWISE_CAPABILITY = (9, 0)
# Only linear layers inside these module lists are quantized.
BLOCK_LISTS = ("transformer_blocks", "blocks")  # some transformers name their list `blocks`


class Float8Linear(torch.nn.Module):
    """y = x W^T + b with W in float8_e4m3fn and x quantized to float8 at run time.

    granularity "row": one scale per output channel of W and per row of x (Hopper);
    "tensor": one scale for each (Ada).
    """

    def __init__(self, linear: torch.nn.Linear, granularity: str = "row"):
        super().__init__()
        if granularity not in ("row", "tensor"):
            raise ValueError(f"granularity must be row or tensor, got {granularity!r}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.granularity = granularity
        weight = linear.weight.detach().to(torch.float32)
        if granularity == "row":
            weight_amax = weight.abs().amax(dim=1, keepdim=True)
        else:
            weight_amax = weight.abs().amax()
        weight_scale = weight_amax.clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight", (weight / weight_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))
        # _scaled_mm wants the weight scale as (1, out_features) for rows, a scalar otherwise.
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1) if granularity == "row" else weight_scale)
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.float32)
        if self.granularity == "row":
            amax = rows.abs().amax(dim=1, keepdim=True)
        else:
            amax = rows.abs().amax()
        x_scale = amax.clamp(min=1e-12) / FP8_MAX
        x_fp8 = (rows / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        # The weight is stored (out, in) row-major, so its transpose is the column-major
        # right operand that FP8 products require.
        out = torch._scaled_mm(
            x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=torch.bfloat16
        )
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, granularity={self.granularity}"


def fp8_layer_names(transformer: torch.nn.Module) -> list[str]:
    """Linear layers of the transformer blocks whose dimensions FP8 products accept."""
    names = []
    for name, module in transformer.named_modules():
        in_blocks = any(name.startswith(f"{blocks}.") for blocks in BLOCK_LISTS)
        if (
            in_blocks
            and isinstance(module, torch.nn.Linear)
            and module.in_features % FP8_ALIGNMENT == 0
            and module.out_features % FP8_ALIGNMENT == 0
        ):
            names.append(name)
    return names


def quantize_linear_layers(transformer: torch.nn.Module, granularity: str, implementation: str) -> int:
    """Swaps the block linears for FP8 ones in place; returns how many were swapped.

    implementation "torchao" uses torchao's quantize_, "scaled_mm" farm's Float8Linear.
    """
    names = fp8_layer_names(transformer)
    if implementation == "torchao":
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )

        scales = PerRow() if granularity == "row" else PerTensor()
        config = Float8DynamicActivationFloat8WeightConfig(granularity=scales)
        wanted = set(names)
        quantize_(transformer, config, filter_fn=lambda module, fqn: fqn in wanted)
        return len(names)
    if implementation != "scaled_mm":
        raise ValueError(f"implementation must be torchao or scaled_mm, got {implementation!r}")
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        setattr(parent, child_name, Float8Linear(getattr(parent, child_name), granularity))
    return len(names)


def torchao_available() -> bool:
    """Whether torchao, with the FP8 config this backend uses, is installed."""
    try:
        quantization = importlib.import_module("torchao.quantization")
    except ImportError:
        return False
    return hasattr(quantization, "Float8DynamicActivationFloat8WeightConfig") and hasattr(quantization, "quantize_")


class Fp8Backend(CompileBackend):
    """FP8 linear layers in the transformer blocks, compiled per shape like `CompileBackend`."""

    name: ClassVar[str] = "fp8"

    def __init__(self, config, device, dtype):
        super().__init__(config, device, dtype)
        self.implementation = "torchao" if torchao_available() else "scaled_mm"
        self.quantized_layers = 0

    @property
    def granularity(self) -> str:
        capability = torch.cuda.get_device_capability(self.device)
        return "row" if capability >= ROWWISE_CAPABILITY else "tensor"

    @property
    def fallback_label(self) -> str:
        # The weights are FP8 for every shape; only compilation is missing.
        return f"fp8-eager-{dtype_name(self.dtype)}"

    @property
    def tolerance(self) -> float:
        return FP8_RELATIVE_TOLERANCE

    def check_available(self) -> None:
        if self.device.type != "cuda":
            raise BackendUnavailable(
                "the fp8 backend needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer: "
                f"Ada, Hopper, Blackwell); this engine runs on {self.device.type}. Use eager, compile or onnx here."
            )
        capability = torch.cuda.get_device_capability(self.device)
        if capability < MIN_FP8_CAPABILITY:
            name = torch.cuda.get_device_name(self.device)
            raise BackendUnavailable(
                f"the fp8 backend needs FP8 tensor cores (compute capability 8.9 or newer); {name} has "
                f"{capability[0]}.{capability[1]}. Use eager, compile or onnx on this GPU."
            )
        if self.dtype != torch.bfloat16:
            raise BackendUnavailable(f"the fp8 backend computes in bfloat16; set the model's dtype to bfloat16 "
                                     f"(it is {dtype_name(self.dtype)})")
        super().check_available()

    def prepare(self, transformer: torch.nn.Module) -> None:
        self.quantized_layers += quantize_linear_layers(transformer, self.granularity, self.implementation)

    def key_fields(self) -> dict[str, Any]:
        fields = super().key_fields()
        fields["fp8"] = {"implementation": self.implementation, "granularity": self.granularity}
        if self.implementation == "torchao":
            import torchao

            fields["versions"]["torchao"] = torchao.__version__
        return fields

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fp8_implementation": self.implementation,
                "fp8_layers": self.quantized_layers}
